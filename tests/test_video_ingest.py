"""Video sources: sampling policies on real encoded files (PyAV), frames stored with timestamps,
videos deduplicated by content, every kind of bad video failing with its reason while the run
carries on, and a real `xdlabel ingest` process killed with SIGKILL mid-video resuming without
duplicate frames."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from sqlalchemy import func, select

from index.db import make_engine, make_session_factory, upgrade
from index.models import Embedding, Image, Video, VideoFrame
from tests.videoclips import Actor, Clip, red_circle_clip, render, still_clip
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import Item, folder_items
from xdlabel.video import Sampling, VideoLimits, open_video, sample_frames
from xdlabel.video_ingest import VideoPipeline


def _times(path: Path, sampling: Sampling) -> list[float]:
    limits = VideoLimits()
    with path.open("rb") as f:
        container, stream, info = open_video(f, limits)
        with container:
            return [round(fr.timestamp, 3) for fr in sample_frames(container, stream, info, sampling, limits)]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm", ".mov"])
def test_fps_and_every_n_sample_the_expected_timestamps(tmp_path: Path, suffix: str) -> None:
    clip = red_circle_clip(tmp_path / f"a{suffix}", fps=10, seconds=4.0, appear=1.0, leave=3.0)
    decoded = _times(clip.path, Sampling())
    assert decoded == [round(n / 10, 3) for n in range(40)]  # every frame, with its own timestamp
    assert _times(clip.path, Sampling(fps=2)) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert _times(clip.path, Sampling(fps=3)) == [t for t in decoded if t in {
        round(min(x for x in decoded if x + 1e-6 >= k / 3), 3) for k in range(12)}]
    assert _times(clip.path, Sampling(every_n=7)) == decoded[::7]


def test_scene_sampling_skips_static_stretches(tmp_path: Path) -> None:
    """A clip whose picture stands still except while a shape crosses it from 2 s to 3 s: scene
    sampling keeps the first frame, the frames of the crossing, and one per ``max_gap``."""
    w, h = 160, 128
    clip = render(Clip(tmp_path / "s.mp4", 10, 6.0, (w, h), [
        Actor("circle", "red", 2.0, 3.0, (30, 60), (130, 60), 25)]))
    kept = _times(clip.path, Sampling(scene=0.02, max_gap=100))
    assert kept[0] == 0.0
    moving = [t for t in kept if t > 0]
    assert moving and all(1.95 <= t <= 3.05 for t in moving), kept  # (+ the frame where it leaves)
    assert len(kept) <= 13 < 60
    gap_kept = _times(clip.path, Sampling(scene=0.02, max_gap=1.0))
    assert {0.0, 1.0, 4.0, 5.0} <= set(gap_kept)  # the still stretches once a second


def test_sampling_settings_are_checked() -> None:
    for bad in ({"fps": 1, "every_n": 2}, {"fps": 0}, {"every_n": 0}, {"scene": 1.5}, {"max_gap": 0}):
        with pytest.raises(ValueError):
            Sampling(**bad)  # type: ignore[arg-type]


@pytest.fixture
def services(migrated_url: str, tmp_path: Path) -> Services:
    return Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64, caption_steps=2))


def test_frames_are_stored_with_timestamps_and_videos_deduplicated(services: Services, tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    red_circle_clip(clips / "a.mp4", seconds=4.0, appear=1.0, leave=3.0)
    still_clip(clips / "b.webm", "triangle", "yellow", seconds=3.0)
    (clips / "copy").mkdir()
    (clips / "copy" / "a-again.mp4").write_bytes((clips / "a.mp4").read_bytes())  # same content, other name
    items = list(folder_items(clips))
    assert len(items) == 3
    report = VideoPipeline(services, "d", sampling=Sampling(fps=2), batch_size=3).run(items)
    assert not report.failed and len(report.added) == 8 + 6
    assert [Path(u).name for u in report.duplicates] == ["a-again.mp4"]
    with services.sessions() as s:
        videos = {Path(v.uri).name: v for v in s.scalars(select(Video))}
        assert set(videos) == {"a.mp4", "b.webm"} and all(v.status == "done" for v in videos.values())
        assert (videos["a.mp4"].frames, videos["a.mp4"].duration, videos["a.mp4"].width) == (8, 4.0, 160)
        assert videos["b.webm"].codec == "vp9" and videos["a.mp4"].sampling == {"fps": 2.0, "max_gap": 10.0}
        frames = s.execute(select(VideoFrame.video_id, VideoFrame.timestamp, Image.uri, Image.width)
                           .join(Image, Image.id == VideoFrame.image_id).order_by(VideoFrame.timestamp)).all()
        times = [t for v, t, _, _ in frames if v == videos["a.mp4"].id]
        assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
        assert all(uri.endswith(f"#t={t:.3f}") and width == 160 for _, t, uri, width in frames)
        assert s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image")) == 14
    again = VideoPipeline(services, "d", sampling=Sampling(fps=2)).run(items)
    assert not again.added and not again.failed and len(again.duplicates) == 3
    services.close()


def _truncated_mkv(path: Path) -> None:
    red_circle_clip(path.with_name("whole.mkv"), seconds=4.0)
    data = path.with_name("whole.mkv").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path.with_name("whole.mkv").unlink()


def test_bad_videos_fail_with_a_reason_and_the_run_carries_on(tmp_path: Path) -> None:
    """Injected, one each: text named .mp4, an empty file, an mp4 cut in half (its index is at the
    end), an mkv cut in half (frames stop early), frames over the pixel limit, a video over the
    duration limit, one over the sampled-frame limit, one over the byte cap, an audio-only file,
    a missing file; then a good video. Each fails with its reason and keeps no frame, the good one
    is stored, and a rerun skips the content failures and tries the unread ones again."""
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "01-text.mp4").write_text("this is not a video")
    (clips / "02-empty.mp4").write_bytes(b"")
    red_circle_clip(clips / "whole.mp4", seconds=3.0)
    data = (clips / "whole.mp4").read_bytes()
    (clips / "03-cut.mp4").write_bytes(data[: len(data) // 2])
    (clips / "whole.mp4").unlink()
    _truncated_mkv(clips / "04-cut.mkv")
    red_circle_clip(clips / "05-huge-frames.mp4", seconds=1.0, size=(320, 256))
    red_circle_clip(clips / "06-long.mp4", seconds=5.0)
    red_circle_clip(clips / "07-many-frames.mp4", fps=25, seconds=3.0)
    red_circle_clip(clips / "08-big-file.mkv", fps=25, seconds=12.0)
    with av.open(str(clips / "09-audio.mkv"), "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    red_circle_clip(clips / "10-good.mp4", seconds=2.0)
    big = (clips / "08-big-file.mkv").stat().st_size
    others = max(p.stat().st_size for p in clips.iterdir() if p.name != "08-big-file.mkv")
    assert big > others + 2
    cap = (big + others) // 2
    services = Services(Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2,
                                 max_image_pixels=200 * 200, max_video_seconds=4.5, max_video_frames=50,
                                 max_video_bytes=cap))
    upgrade(services.settings.sqlalchemy_url)
    items = list(folder_items(clips)) + [Item((clips / "11-missing.mp4").as_uri())]
    report = VideoPipeline(services, "bad", sampling=Sampling(every_n=1)).run(items)
    reasons = {Path(u).name: r for u, r in report.failed.items()}
    assert set(reasons) == {p.name for p in clips.iterdir()} - {"10-good.mp4"} | {"11-missing.mp4"}
    assert "not a readable video" in reasons["01-text.mp4"] and "not a readable video" in reasons["02-empty.mp4"]
    assert "not a readable video" in reasons["03-cut.mp4"]
    assert reasons["04-cut.mkv"].startswith("truncated: frames end at")
    assert "over the 40000-pixel limit" in reasons["05-huge-frames.mp4"]
    assert "over the 4-second limit" in reasons["06-long.mp4"]  # 4.5 shown as 4: %.0f
    assert "75 frames would be sampled, more than 50" in reasons["07-many-frames.mp4"]
    assert f"video of {big} bytes is over the {cap}-byte limit" == reasons["08-big-file.mkv"]
    assert reasons["09-audio.mkv"] == "not a video: no video stream"
    assert reasons["11-missing.mp4"].startswith("no such file")
    assert len(report.added) == 20  # the good one, every frame
    with services.sessions() as s:
        states = {Path(v.uri).name: (v.status, v.error) for v in s.scalars(select(Video))}
        assert states["10-good.mp4"] == ("done", None)
        assert {n for n, (st, _) in states.items() if st == "failed"} == set(reasons)
        assert s.scalar(select(func.count()).select_from(Image)) == 20  # the cut mkv's early frames are gone
        assert s.scalar(select(func.count()).select_from(VideoFrame)) == 20
    again = VideoPipeline(services, "bad", sampling=Sampling(every_n=1)).run(items)
    # Like images: bytes that are not a usable video are remembered; what could not be read (over the
    # byte cap, missing) is tried again.
    assert not again.added and sorted(Path(u).name for u in again.failed) == ["08-big-file.mkv", "11-missing.mp4"]
    assert len(again.duplicates) == len(items) - 2
    services.close()


def test_killed_video_ingest_resumes_without_duplicate_frames(tmp_path: Path) -> None:
    """Injected: a real `xdlabel ingest clips/ --fps 4` process is SIGKILLed at a random moment (seeded)
    after it has committed new frames, and restarted; three kills in a row, each landing mid-video
    on what the previous run left, then a run to completion: every sampled frame is stored once,
    with one image vector, and both videos are done with their frame counts."""
    clips = tmp_path / "clips"
    red_circle_clip(clips / "a.mp4", seconds=8.0)
    still_clip(clips / "b.mkv", "square", "green", seconds=6.0)
    expected = 8 * 4 + 6 * 4
    rng = random.Random(14)
    data = tmp_path / "data"
    env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_SHORT_SIDE": "64", "XDLABEL_CAPTION_STEPS": "2",
           "OMP_NUM_THREADS": "1"}
    url = f"sqlite:///{data / 'xdlabel.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)

    def frames() -> int:
        with sessions() as s:
            return int(s.scalar(select(func.count()).select_from(VideoFrame)) or 0)

    cmd = [sys.executable, "-m", "xdlabel.cli", "ingest", str(clips), "--dataset", "v", "--fps", "4",
           "--batch-size", "2"]
    counts = [0]
    for kill in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        # Killed once 1-6 new frames are stored: a point in the run, not in time (a sleep after the first frame
        # outlasted the whole run on an idle machine).
        target = counts[-1] + rng.randint(1, 6)
        while time.monotonic() < deadline and proc.poll() is None and frames() < target:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(frames())
        assert counts[-2] < counts[-1] < expected, f"kill {kill} landed at {counts}; the test needs mid-run kills"
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    with sessions() as s:
        keys = s.execute(select(VideoFrame.video_id, VideoFrame.pts)).all()
        assert len(keys) == expected == len(set(keys))
        assert s.scalar(select(func.count()).select_from(Image)) == expected
        assert s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image")) == expected
        assert sorted(s.scalars(select(Video.status))) == ["done", "done"]
        assert sorted(s.scalars(select(Video.frames))) == [24, 32]
    engine.dispose()

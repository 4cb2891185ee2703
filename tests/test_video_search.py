"""Moments: text -> video search grouping adjacent frames of one video into a time range, from the
command line (real processes) and over HTTP (real uvicorn), with video filters and the verified
video bytes served with ranges."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image as PILImage

from index.db import upgrade
from tests.conftest import Server
from tests.videoclips import red_circle_clip, still_clip
from xdlabel.moments import group_moments
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import folder_items
from xdlabel.video import Sampling, VideoLimits, open_video, sample_frames
from xdlabel.video_ingest import VideoPipeline


def test_group_moments_properties() -> None:
    """500 seeded random score sequences (noise, and noise with one raised stretch): moments are
    disjoint maximal runs in time order, every frame of a moment scores above every frame bordering
    it, each moment's best is its top frame, the overall best frame is in the first moment, and a
    clearly raised stretch is found exactly."""
    rng = random.Random(7)
    for trial in range(500):
        n = rng.randint(1, 40)
        times = sorted(rng.sample(range(1000), n))
        times_s = [t / 10 for t in times]
        scores = [rng.gauss(0.2, 0.05) for _ in range(n)]
        lift = trial % 2 == 1 and n >= 6
        if lift:
            a = rng.randint(1, n - 3)
            b = rng.randint(a, n - 2)
            for j in range(a, b + 1):
                scores[j] += 0.5
        moments = group_moments(times_s, scores, duration=times_s[-1] + 1)
        assert moments, "every video with frames has a moment"
        assert max(range(n), key=lambda j: scores[j]) in range(moments[0].first, moments[0].last + 1)
        assert [m.score for m in moments] == sorted((m.score for m in moments), reverse=True)
        spans = sorted((m.first, m.last) for m in moments)
        assert all(x[1] + 1 < y[0] for x, y in zip(spans, spans[1:], strict=False))  # disjoint, not touching
        for m in moments:
            inside = scores[m.first:m.last + 1]
            border = [scores[j] for j in (m.first - 1, m.last + 1) if 0 <= j < n]
            assert all(min(inside) > s for s in border)
            assert m.score == max(inside) and scores[m.best] == m.score
            assert m.start == times_s[m.first]
            assert m.end == (times_s[m.last + 1] if m.last + 1 < n else times_s[-1] + 1)
        if lift:
            assert (moments[0].first, moments[0].last) == (a, b), (trial, scores)
    assert group_moments([], [], None) == []


def test_cli_ingest_then_search_by_moment(tmp_path: Path) -> None:
    """`xdlabel ingest clips/ --fps 1` then `xdlabel search "a red circle" --group video`, as processes:
    the red circle is on screen from 3 s to 6 s of a.mp4 only."""
    clips = tmp_path / "clips"
    red_circle_clip(clips / "a.mp4", seconds=8.0, appear=3.0, leave=6.0)
    still_clip(clips / "b.mkv", "triangle", "yellow", seconds=6.0)
    still_clip(clips / "c.webm", "square", "blue", seconds=5.0, ground="water")
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_SHORT_SIDE": "64",
           "XDLABEL_CAPTION_STEPS": "2", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "xdlabel.cli"]
    ingest = subprocess.run(cli + ["ingest", str(clips), "--dataset", "d", "--fps", "1", "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["added"] == 8 + 6 + 5
    search = subprocess.run(cli + ["search", "a red circle", "--group", "video", "--json", "-k", "3"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr
    moments = json.loads(search.stdout)
    top = moments[0]
    assert top["uri"] == "a.mp4" and (top["start"], top["end"]) == (3.0, 6.0), moments
    assert 3.0 <= top["best_time"] <= 5.0 and top["frames"] == 3
    assert all(m["score"] < top["score"] for m in moments[1:])


def test_moments_over_http_with_filters_and_the_video_bytes(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    red_circle_clip(clips / "a.mp4", seconds=8.0, appear=2.0, leave=5.0)
    red_circle_clip(clips / "short.mkv", seconds=4.0, appear=0.0, leave=2.0)
    still_clip(clips / "b.webm", "triangle", "yellow", seconds=4.0)
    services = Services(Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2,
                                 require_api_key=False))
    upgrade(services.settings.sqlalchemy_url)
    report = VideoPipeline(services, "d", sampling=Sampling(fps=2)).run(folder_items(clips))
    assert len(report.added) == 16 + 8 + 8 and not report.failed
    with Server(services) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/search/moments", json={"query": "a red circle", "k": 5})
        assert answer.status_code == 200, answer.text
        moments = answer.json()["moments"]
        by_video = {m["uri"]: m for m in moments}
        assert {moments[0]["uri"], moments[1]["uri"]} == {"a.mp4", "short.mkv"}
        assert (by_video["a.mp4"]["start"], by_video["a.mp4"]["end"]) == (2.0, 5.0)
        assert (by_video["short.mkv"]["start"], by_video["short.mkv"]["end"]) == (0.0, 2.0)
        # Filters on the video's record: the 4-second videos are left out, then only vp9.
        long_only = client.post("/v1/search/moments", json={"query": "a red circle",
                                                            "filters": {"min_duration": 5}}).json()["moments"]
        assert {m["uri"] for m in long_only} == {"a.mp4"}
        vp9 = client.post("/v1/search/moments", json={"query": "a red circle",
                                                      "filters": {"codecs": ["vp9"]}}).json()["moments"]
        assert {m["uri"] for m in vp9} == {"b.webm"}
        assert client.post("/v1/search/moments", json={"query": "x", "filters": {"max_duration": -1}}
                           ).status_code == 422
        # The bytes behind "play", whole and by range, and the record.
        top = by_video["a.mp4"]
        assert top["play"] == f"/v1/videos/{top['video_id']}/file#t=2.0,5.0"
        original = (clips / "a.mp4").read_bytes()
        whole = client.get(f"/v1/videos/{top['video_id']}/file")
        assert whole.status_code == 200 and whole.content == original
        assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
        rng = np.random.default_rng(3)
        for _ in range(20):  # 20 random ranges, each compared with the file's own slice
            a, b = sorted(int(x) for x in rng.integers(0, len(original), 2))
            part = client.get(f"/v1/videos/{top['video_id']}/file", headers={"Range": f"bytes={a}-{b}"})
            assert part.status_code == 206 and part.content == original[a:b + 1]
            assert part.headers["content-range"] == f"bytes {a}-{b}/{len(original)}"
        tail = client.get(f"/v1/videos/{top['video_id']}/file", headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == original[-100:]
        assert client.get(f"/v1/videos/{top['video_id']}/file",
                          headers={"Range": f"bytes={len(original)}-"}).status_code == 416
        record = client.get(f"/v1/videos/{top['video_id']}").json()
        assert (record["uri"], record["status"], record["frames"], record["codec"]) == ("a.mp4", "done", 16, "h264")
        assert client.get("/v1/videos/999999").status_code == 404
        # A frame's original is that frame, decoded again from the verified video.
        with (clips / "a.mp4").open("rb") as f:
            container, stream, info = open_video(f, VideoLimits())
            with container:
                decoded = {round(fr.timestamp, 3): fr.rgb
                           for fr in sample_frames(container, stream, info, Sampling(fps=2), VideoLimits())}
        png = client.get(f"/v1/images/{top['best_image_id']}/original")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(png.content))), decoded[top["best_time"]])
        assert client.get(f"/v1/images/{top['best_image_id']}/thumbnail").status_code == 200
        # Changed on disk since it was ingested: neither the video nor its frames are served.
        (clips / "a.mp4").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert client.get(f"/v1/videos/{top['video_id']}/file").status_code == 404
        assert client.get(f"/v1/images/{top['best_image_id']}/original").status_code == 404
    services.close()

"""Video pre-labels against a real Label Studio 1.23.2: a generated video (PyAV: a blue square crossing
the clip, a red circle crossing it from 2 to 4 s) in a <Video>/<VideoRectangle> project, `xdlabel
prelabel` run as a process with the bundled model, the prediction read back from Label Studio, and
its tracks' boxes, interpolated as Label Studio interpolates keyframes, compared with the
generator's ground truth on every sampled frame."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio
from annotator.video_tracks import box_iou, ls_frame
from tests.videoclips import Clip, red_circle_clip

FRAME_RATE = 10
CONFIG = f"""<View>
  <Video name="video" value="$video" frameRate="{FRAME_RATE}"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video">
    <Label value="Circle" predicted_values="a red circle"/>
    <Label value="Square" predicted_values="a blue square"/>
  </Labels>
</View>"""


def box_at(result: dict[str, Any], frame: int, size: tuple[int, int]) -> tuple[float, ...] | None:
    """The track's box (pixels) at a Label Studio frame: keyframes interpolated linearly while the
    earlier one is enabled, nothing past a disabled one (Label Studio's rule)."""
    seq = sorted(result["value"]["sequence"], key=lambda k: k["frame"])
    w, h = size
    for a, b in zip(seq, [*seq[1:], None], strict=True):
        if a["frame"] == frame or (b is not None and a["enabled"] and a["frame"] < frame < b["frame"]):
            u = 0.0 if b is None or a["frame"] == frame else (frame - a["frame"]) / (b["frame"] - a["frame"])
            x, y, bw, bh = ((1 - u) * a[k] + u * (b[k] if b else 0) for k in ("x", "y", "width", "height"))
            return x * w / 100, y * h / 100, (x + bw) * w / 100, (y + bh) * h / 100
    return None


@pytest.fixture(scope="module")
def video_project(label_studio: LocalLabelStudio, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[LabelStudioClient, int, list[int], Clip]:
    client = LabelStudioClient(label_studio.url, label_studio.token)
    folder = label_studio.files_root / "video"
    clip = red_circle_clip(folder / "a.webm", fps=FRAME_RATE, seconds=6.0, appear=2.0, leave=4.0)
    project = client.sdk.projects.create(title="video", label_config=CONFIG)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    tasks = [{"data": {"video": "/data/local-files/?d=video/a.webm"}},
             {"data": {"video": "/data/local-files/?d=video/missing.webm"}}]
    imported = client.sdk.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    return client, project.id, list(imported.task_ids), clip


def test_prelabel_pushes_tracks_that_follow_the_moving_shapes(video_project, label_studio: LocalLabelStudio,
                                                              tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, project_id, (task_id, missing_id), clip = video_project
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_SHORT_SIDE": "64", "XDLABEL_CAPTION_STEPS": "2",
           "XDLABEL_LS_SCORE_THRESHOLD": "0.5", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", "--project", str(project_id),
                           "--task", "ground", "--video-fps", "2", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["predicted"] == 1 and report["delivered"] == 1 and report["pending"] == 0
    assert list(report["failed"]) == [str(missing_id)] and "missing.webm" in report["failed"][str(missing_id)]

    (task,) = [t for t in client.tasks(project_id) if t["id"] == task_id]
    (prediction,) = task["predictions"]
    tracks: dict[str, list[dict[str, Any]]] = {}
    for result in prediction["result"]:
        assert result["type"] == "videorectangle" and result["from_name"] == "box"
        assert result["value"]["framesCount"] == 60 and abs(result["value"]["duration"] - 6.0) < 0.05
        tracks.setdefault(result["value"]["labels"][0], []).append(result)
    assert sorted(tracks) == ["Circle", "Square"] and all(len(v) == 1 for v in tracks.values()), tracks
    checked = 0
    for t in [0.5 * k for k in range(12)]:  # the sampled frames
        for actor in clip.actors:
            label = {"circle": "Circle", "square": "Square"}[actor.kind]
            box = box_at(tracks[label][0], ls_frame(t, FRAME_RATE), clip.size)
            if not actor.visible(t):
                assert box is None, (label, t, box)
                continue
            assert box is not None, (label, t)
            iou = box_iou(box, clip.box(actor, t))  # type: ignore[arg-type]
            assert iou >= 0.5, (label, t, iou)
            checked += 1
    assert checked == 12 + 4  # the square on all 12 sampled frames, the circle on its 4 (2.0-3.5 s)

    # Run again: the task holds this model version's prediction, so nothing is redone.
    again = subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", "--project", str(project_id),
                            "--task", "ground", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == 1

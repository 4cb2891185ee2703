"""Video pre-labels against a real Label Studio 1.23.2: a generated video (PyAV: a blue square crossing
the clip, a red circle crossing it from 2 to 4 s) in a <Video>/<VideoRectangle> project, `xdlabel
prelabel` run as a process with the bundled model, the prediction read back from Label Studio, and
its tracks' boxes, interpolated as Label Studio interpolates keyframes, compared with the
generator's ground truth on every sampled frame."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio
from annotator.video_tracks import box_iou, ls_frame
from tests.test_search_page import CHROMIUM, FLAGS
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


@pytest.fixture(scope="module")
def prelabelled(video_project, label_studio: LocalLabelStudio, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """`xdlabel prelabel` run once as a process on the video project; its JSON report."""
    client, project_id, _, _ = video_project
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path_factory.mktemp("data")), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_CAPTION_STEPS": "2",
           "XDLABEL_LS_SCORE_THRESHOLD": "0.5", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", "--project", str(project_id),
                           "--task", "ground", "--video-fps", "2", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {"report": json.loads(done.stdout), "env": env}


def test_prelabel_pushes_tracks_that_follow_the_moving_shapes(video_project, prelabelled) -> None:  # type: ignore[no-untyped-def]
    client, project_id, (task_id, missing_id), clip = video_project
    report, env = prelabelled["report"], prelabelled["env"]
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

    # Run again: the task holds this model version's prediction, so nothing is redone (nor the model loaded).
    again = subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", "--project", str(project_id),
                            "--task", "ground", "--task-id", str(task_id), "--json"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == 1


def test_the_tracks_appear_in_the_label_studio_editor(video_project, prelabelled, label_studio: LocalLabelStudio,
                                                       tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium logs into Label Studio and opens the task: the editor lists both regions, its
    timeline holds one keypoint per keyframe of each track, and a click on the circle's second
    keyframe moves the player to that frame (26 of 60: 2.5 s at 10 fps), where the box is drawn."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import sync_playwright

    client, project_id, (task_id, _), _ = video_project
    (task,) = [t for t in client.tasks(project_id) if t["id"] == task_id]
    keyframes = {r["value"]["labels"][0]: len(r["value"]["sequence"]) for r in task["predictions"][0]["result"]}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(label_studio.url + "/user/login/")
        page.fill("input[name=email]", label_studio.user)
        page.fill("input[name=password]", label_studio.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
        page.wait_for_selector(".lsf-keypoints__point", timeout=60_000)
        rows = {label: page.locator(".lsf-keypoints", has_text=label) for label in ("Circle", "Square")}
        assert {label: row.locator(".lsf-keypoints__point").count() for label, row in rows.items()} == keyframes
        rows["Circle"].locator(".lsf-keypoints__point").nth(1).click()
        page.wait_for_function("document.querySelector('.lsf-frames-control').innerText.startsWith('26')",
                               timeout=20_000)
        assert "of 60" in page.locator(".lsf-frames-control").inner_text()
        page.screenshot(path=str(tmp_path / "label-studio-video.png"))
        if os.environ.get("XDLABEL_SCREENSHOTS"):
            shutil.copy(tmp_path / "label-studio-video.png",
                        Path(os.environ["XDLABEL_SCREENSHOTS"]) / "label-studio-video.png")
        browser.close()

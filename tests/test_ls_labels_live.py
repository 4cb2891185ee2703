"""Routing, redo, threshold precedence and the per-label summary against a real Label Studio 1.23.2
(tests/conftest.py starts it), with the bundled model on shape scenes it was trained on."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from annotator.client import LabelStudioAuthError, LabelStudioClient
from annotator.convert import result_label, result_to_mask
from annotator.localserver import LocalLabelStudio
from annotator.prelabel import PrelabelSettings
from annotator.project import PrelabelOptions, prelabel_project
from bench.ls_walkthrough import CONFIG
from index.db import make_engine, make_session_factory, upgrade
from tests.test_ls_labels import SHAPES_CONFIG, bundled  # noqa: F401 - the model fixture
from xdecoder import Predictor
from xdecoder.training.synthetic import CLASSES, make_scenes

VERSION = "shapes-v1"


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'xdlabel.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def shapes_project(client: LabelStudioClient, server: LocalLabelStudio, title: str, n: int,
                   config: str = SHAPES_CONFIG) -> tuple[int, list[int]]:
    """A project of ``n`` seeded shape scenes served by Label Studio's local files storage."""
    folder = server.files_root / title
    folder.mkdir(parents=True)
    for k, scene in enumerate(make_scenes(n, seed=11, size=(96, 64))):
        Image.fromarray(scene.image).save(folder / f"s{k}.png")
    project = client.sdk.projects.create(title=title, label_config=config)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    tasks = [{"data": {"image": f"/data/local-files/?d={title}/s{k}.png"}} for k in range(n)]
    return project.id, list(client.sdk.projects.import_tasks(id=project.id, request=tasks,
                                                             return_task_ids=True).task_ids)


def stored(client: LabelStudioClient, project_id: int) -> dict[int, list[dict[str, Any]]]:
    return {t["id"]: [p for p in t["predictions"] if p["model_version"] == VERSION] for t in client.tasks(project_id)}


def test_summary_counts_redo_after_deleting_in_label_studio_force_and_threshold_precedence(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, bundled: Predictor,  # noqa: F811
        sessions) -> None:  # type: ignore[no-untyped-def]
    # the rectangle control asks for 0.9 in the config: --threshold must win over it both ways
    config = SHAPES_CONFIG.replace('<RectangleLabels name="rect" toName="image">',
                                   '<RectangleLabels name="rect" toName="image" model_score_threshold="0.9">')
    project_id, task_ids = shapes_project(ls_client, label_studio, "redo", 4, config)
    # instance mode: many weak candidates, so the thresholds have something to drop
    base = PrelabelOptions(batch_size=2, task="instance", default_threshold=0.3, thresholds={"Nope": 0.2})
    first = prelabel_project(bundled, ls_client, sessions, project_id, VERSION, base)
    assert first.predicted == 4 and first.delivery.delivered == 4
    assert first.warnings == ["threshold for 'Nope': no control has that label"]  # reported, not silent
    # the summary is what Label Studio holds, per control and label
    held = stored(ls_client, project_id)
    counts = Counter((r["from_name"], result_label(r)) for preds in held.values() for r in preds[0]["result"])
    assert {(r["control"], r["label"]): r["regions"] for r in first.labels if r["regions"]} == dict(counts)
    rect = {r["label"]: r for r in first.labels if r["control"] == "rect"}
    assert rect["Triangle"]["threshold"] == 0.9 and rect["Triangle"]["under_threshold"] > 0
    assert not next(r for r in first.labels if r["control"] == "poly" and r["label"] == "Circle")["found"]
    for preds in held.values():  # the config's 0.9 held in the rectangle control, 0.3 elsewhere
        for r in preds[0]["result"]:
            assert r["score"] >= (0.9 if r["from_name"] == "rect" else 0.3)

    # Predictions deleted in Label Studio: a plain rerun predicts those tasks again, and only those.
    gone = task_ids[1]
    ls_client.sdk.predictions.delete(id=held[gone][0]["id"])
    again = prelabel_project(bundled, ls_client, sessions, project_id, VERSION, base)
    assert (again.predicted, again.skipped) == (1, 3)
    assert all(len(v) == 1 for v in stored(ls_client, project_id).values())

    # --force with --threshold 0: every candidate region is made, the config's 0.9 notwithstanding;
    # each task still holds one prediction of the version, the new one.
    low = prelabel_project(bundled, ls_client, sessions, project_id, VERSION,
                           PrelabelOptions(batch_size=2, task="instance", default_threshold=0.3, threshold=0.0,
                                           force=True))
    assert low.predicted == 4 and low.skipped == 0
    assert all(r["under_threshold"] == 0 for r in low.labels)
    redone = stored(ls_client, project_id)
    assert all(len(v) == 1 for v in redone.values())
    scores = [r["score"] for v in redone.values() for r in v[0]["result"] if r["from_name"] == "rect"]
    assert scores and min(scores) < 0.9
    total = sum(len(v[0]["result"]) for v in redone.values())
    assert total == sum(r["regions"] for r in low.labels) > sum(counts.values())
    # --force --task-id with --threshold 1.01: that task alone is redone, with no region at all
    high = prelabel_project(bundled, ls_client, sessions, project_id, VERSION, PrelabelOptions(
        task="instance", threshold=1.01, force=True, task_ids=frozenset({task_ids[0]})))
    assert (high.tasks, high.predicted) == (1, 1) and all(r["regions"] == 0 for r in high.labels)
    final = stored(ls_client, project_id)
    assert final[task_ids[0]][0]["result"] == [] and all(len(v) == 1 for v in final.values())
    assert final[task_ids[2]][0]["result"] == redone[task_ids[2]][0]["result"]
    # no object twice in one control, in any prediction made here
    for preds in redone.values():
        by_control: dict[str, list[np.ndarray]] = {}
        for r in preds[0]["result"]:
            mask = result_to_mask(r)
            assert mask is not None
            for other in by_control.get(r["from_name"], []):
                assert (mask & other).sum() < 0.8 * (mask | other).sum()
            by_control.setdefault(r["from_name"], []).append(mask)


def test_cli_reports_a_wrong_token_or_project_before_loading_the_model_and_prints_the_summary(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    """As processes. The checkpoint named does not exist, so the connection errors can only come
    first if nothing touched the model before; then a real run prints the per-label table."""
    project_id, _ = shapes_project(ls_client, label_studio, "cli-summary", 2)
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": "wrong-token", "XDLABEL_CHECKPOINT": str(tmp_path / "missing.safetensors"),
           "XDLABEL_CAPTION_STEPS": "2"}

    def prelabel(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    # CPU seconds, not wall: on a shared 2-core machine the wall time is the other jobs' as much as ours
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = prelabel("--project", str(project_id))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "refused the token" in done.stderr and "XDLABEL_LS_TOKEN" in done.stderr and "{" not in done.stderr
    env["XDLABEL_LS_TOKEN"] = label_studio.token
    done = prelabel("--project", "987654")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: Label Studio at {label_studio.url} has no project 987654 (404)")
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime < 60
    del env["XDLABEL_CHECKPOINT"]  # the bundled model
    done = prelabel("--project", str(project_id), "--threshold", "0.3", "--no-captions")
    assert done.returncode == 0, done.stderr
    table = done.stdout[done.stdout.index("control:label"):].splitlines()
    assert table[1].split()[0] == "mask:Ball"
    # the polygon's Circle is the brush's circle and the box's Box the polygon's: routed there, so
    # listed apart from what the model never proposed
    elsewhere = next(line for line in table if line.startswith("not routed here"))
    assert elsewhere.endswith(": poly:Circle, rect:Box")
    assert not any("poly:Circle" in line for line in table if line.startswith("never found: "))


def _box_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    if rows.size:
        box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return box


def test_every_region_carries_the_label_a_person_would_pick_on_photos_and_shapes(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, bundled: Predictor,  # noqa: F811
        sessions) -> None:  # type: ignore[no-untyped-def]
    """The README's walkthrough config (bench/ls_walkthrough.py) in a real Label Studio on a project of 6
    seeded shape scenes and 3 photos (scikit-image's coffee, chelsea and astronaut, scaled to 160 px wide),
    pre-labelled as the config asks (panoptic). On the shape scenes, every region Label Studio holds
    carries the label a person would pick for the object under it: the label of the scene's true class
    covering most of a mask (for a box, the object whose bounding box it overlaps most). On every image,
    a region sits only in its label's tool (Ball and the ground brushed, Box a polygon, Triangle a box),
    and no control shows one object twice. Every shape scene has at least one region checked."""
    title = "photos-and-shapes"
    folder = label_studio.files_root / title
    folder.mkdir(parents=True)
    scenes = make_scenes(6, seed=11, size=(160, 128))
    for k, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(folder / f"s{k}.png")
    names = [f"s{k}.png" for k in range(len(scenes))]
    for name in ("coffee", "chelsea", "astronaut"):
        image = Image.fromarray(getattr(photos, name)())
        image.resize((160, round(160 * image.height / image.width))).save(folder / f"{name}.png")
        names.append(f"{name}.png")
    project = ls_client.sdk.projects.create(title=title, label_config=CONFIG)
    ls_client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    task_ids = list(ls_client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={title}/{name}"}} for name in names]).task_ids)
    report = prelabel_project(bundled, ls_client, sessions, project.id, VERSION,
                              PrelabelOptions(prelabel=PrelabelSettings(captions=False)))
    assert report.predicted == len(names) and report.delivery.delivered == len(names)
    held = stored(ls_client, project.id)
    person = {"circle": "Ball", "square": "Box", "triangle": "Triangle", "sky": "Sky", "grass": "Grass",
              "sand": "Sand", "water": "Water"}
    tool = {"Ball": "mask", "Sky": "mask", "Grass": "mask", "Sand": "mask", "Water": "mask", "Box": "poly",
            "Triangle": "box"}
    checked = [0] * len(scenes)
    for k, task_id in enumerate(task_ids):
        (prediction,) = held[task_id]
        by_control: dict[str, list[np.ndarray]] = {}
        for result in prediction["result"]:
            label, mask = result_label(result), result_to_mask(result)
            assert mask is not None and tool[str(label)] == result["from_name"], (names[k], result["from_name"], label)
            for other in by_control.get(result["from_name"], []):
                assert (mask & other).sum() < 0.8 * (mask | other).sum(), f"{names[k]}: one object twice"
            by_control.setdefault(result["from_name"], []).append(mask)
            if k >= len(scenes):
                continue
            scene = scenes[k]
            if result["type"] == "rectanglelabels":
                truth = max(scene.segments, key=lambda s: (_box_of(scene.mask(s.id)) & mask).sum()
                            / (_box_of(scene.mask(s.id)) | mask).sum())
            else:
                truth = max(scene.segments, key=lambda s: (scene.mask(s.id) & mask).sum())
            assert label == person[CLASSES[truth.category_id]], (names[k], label, CLASSES[truth.category_id])
            checked[k] += 1
    assert min(checked) >= 1, checked  # no shape scene passes for want of regions


def test_a_personal_access_token_works_as_xdlabel_ls_token(ls_client: LabelStudioClient,
                                                           label_studio: LocalLabelStudio) -> None:
    """The walkthrough's token step: a personal access token (what Account & Settings creates) reads the
    project and its tasks like the legacy token; a made-up one is refused with the token named."""
    project_id, task_ids = shapes_project(ls_client, label_studio, "pat", 1)
    ls_client.sdk.jwt_settings.update(api_token_ttl_days=30, api_tokens_enabled=True, legacy_api_tokens_enabled=True)
    token = ls_client.sdk.tokens.create().token
    assert token and token != label_studio.token
    personal = LabelStudioClient(label_studio.url, token)
    assert personal.project(project_id)["id"] == project_id
    assert [t["id"] for t in personal.tasks(project_id)] == task_ids
    with pytest.raises(LabelStudioAuthError, match="XDLABEL_LS_TOKEN"):
        LabelStudioClient(label_studio.url, token[:-4] + "abcd").project(project_id)

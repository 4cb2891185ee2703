"""Exports: objects counted once across controls, file names, categories in config order with
``isthing``, unannotated tasks left out, and the live export equal to the one from the store (a real
Label Studio 1.23.2 for the live side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from annotator.client import LabelStudioClient
from annotator.convert import box_result, brush_result, coco_rle_to_mask, mask_to_box, polygon_result, result_to_mask
from annotator.dataset import scenes_from_coco
from annotator.export import file_name, tasks_from_store, to_coco
from annotator.labeling import parse_labeling_config
from annotator.localserver import LocalLabelStudio
from index.db import make_engine, make_session_factory, upgrade
from index.models import Annotation

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle"/><Label value="Sky" stuff="true"/><Label value="Box"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="ball"/><Label value="Box"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="Ball"/><Label value="Box"/></RectangleLabels>
  <TextArea name="caption" toName="image"/>
</View>"""
H, W = 60, 80


def _disk(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _in(control: str, mask: np.ndarray, label: str) -> dict[str, Any]:
    if control == "mask":
        return brush_result(mask, label, "mask", "image")
    if control == "poly":
        result = polygon_result(mask, label, "poly", "image", tolerance=0)
        assert result is not None
        return result
    box = mask_to_box(mask)
    assert box is not None
    return box_result(box, H, W, label, "rect", "image")


def test_file_names() -> None:
    assert file_name("/data/local-files/?d=photos/a%20b.png") == "photos/a b.png"
    assert file_name("http://127.0.0.1:8080/data/local-files/?d=/x/y.jpg") == "x/y.jpg"
    assert file_name("/data/upload/3/1a2b3c4d-cat.png") == "1a2b3c4d-cat.png"
    assert file_name("https://cdn.example.com/img/dog.jpg?sig=abc#f") == "dog.jpg"
    assert file_name("s3://bucket/a/b/c.png") == "c.png"


def test_an_object_drawn_in_several_controls_counts_once() -> None:
    """40 seeded trials: 1-4 disjoint objects per image, each drawn in a random non-empty set of
    controls (brush, polygon, box; label spelt "ball" or "Ball"), plus two equal Sky regions in the
    brush (two objects in one control stay two). COCO holds exactly one
    annotation per object, the finest drawing of it (brush, else polygon, else box)."""
    config = parse_labeling_config(CONFIG)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        results = []
        finest = []
        n = int(rng.integers(1, 5))
        for k in range(n):
            mask = _disk(15 + 30 * (k // 2), 18 + 40 * (k % 2), int(rng.integers(5, 10)))
            label = str(rng.choice(["Ball", "Box"]))
            controls = [c for c in ("mask", "poly", "rect") if rng.random() < 0.6] or ["rect"]
            for control in rng.permutation(controls):
                spelt = label.lower() if label == "Ball" and rng.random() < 0.5 else label
                results.append(_in(str(control), mask, spelt))
            finest.append((label, _in(controls[0], mask, label)))
        twin = _disk(15, 22, 6)  # drawn twice in one control: two objects, whatever they overlap
        results.append(brush_result(twin, "Sky", "mask", "image"))
        results.append(brush_result(twin, "Sky", "mask", "image"))
        task = {"id": 1, "data": {"image": "/data/local-files/?d=p/x.png"},
                "annotations": [{"id": 9, "result": results}]}
        coco = to_coco([task], config)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        assert [c["name"] for c in coco["categories"]] == ["Ball", "Sky", "Box"]  # config order, once each
        assert [c["isthing"] for c in coco["categories"]] == [1, 0, 1]
        got = coco["annotations"]
        assert len(got) == n + 2, seed
        for (label, expected), ann in zip(finest, got[:n], strict=True):
            assert names[ann["category_id"]] == label
            assert np.array_equal(coco_rle_to_mask(ann["segmentation"]), result_to_mask(expected)), seed


def test_live_and_stored_exports_agree_and_round_trip(label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    """A project of 4 tasks, 3 annotated in Label Studio (one object in two controls, a stuff region,
    a cancelled annotation), one not. The export from Label Studio and the one from the store (rows
    as the webhook keeps them: the annotation as Label Studio has it, in another order) are equal;
    pycocotools and the fine-tuning reader read it back: the same pixels, stuff as stuff."""
    client = LabelStudioClient(label_studio.url, label_studio.token)
    title = "export-live-store"
    folder = label_studio.files_root / title
    folder.mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(folder / f"i{k}.png")
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    task_ids = list(client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={title}/i{k}.png"}} for k in range(4)]).task_ids)
    drawn: dict[int, dict[str, np.ndarray]] = {}
    for k, task_id in enumerate(task_ids[:3]):
        ball, sky = _disk(20 + 5 * k, 25, 8), np.zeros((H, W), bool)
        sky[:12] = True
        drawn[task_id] = {"Ball": ball, "Sky": sky}
        client.sdk.annotations.create(id=task_id, result=[
            _in("rect", ball, "Ball"), _in("mask", ball, "Ball"), brush_result(sky, "Sky", "mask", "image"),
            {"type": "textarea", "from_name": "caption", "to_name": "image", "value": {"text": [f"t{k}"]}}])
    client.sdk.annotations.create(id=task_ids[0], was_cancelled=True,
                                  result=[brush_result(_disk(40, 60, 5), "Box", "mask", "image")])
    config = parse_labeling_config(client.project(project.id)["label_config"])
    live_tasks = list(client.tasks(project.id))
    live = to_coco(live_tasks, config)

    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        for task in reversed(live_tasks):  # another arrival order than the live listing
            for annotation in task["annotations"]:
                session.add(Annotation(ls_annotation_id=annotation["id"], ls_task_id=task["id"],
                                       ls_project_id=project.id, action="ANNOTATION_CREATED",
                                       task_data=task["data"], payload=annotation))
        session.commit()
        stored = to_coco(tasks_from_store(session, project.id), config)
    engine.dispose()
    assert stored == live
    assert [i["id"] for i in live["images"]] == task_ids[:3]  # the unannotated task is left out
    assert [i["file_name"] for i in live["images"]] == [f"{title}/i{k}.png" for k in range(3)]
    assert all(i["height"] == H and i["width"] == W for i in live["images"])
    assert len(to_coco(live_tasks, config, all_tasks=True)["images"]) == 4
    assert [(c["name"], c["isthing"]) for c in live["categories"]] == [("Ball", 1), ("Sky", 0), ("Box", 1)]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(live))
    loaded = COCO(str(path))
    names = {c["id"]: c["name"] for c in loaded.loadCats(loaded.getCatIds())}
    for task_id in task_ids[:3]:
        anns = loaded.loadAnns(loaded.getAnnIds(imgIds=[task_id]))
        got = {names[a["category_id"]]: loaded.annToMask(a).astype(bool) for a in anns}
        assert len(anns) == 2 and got.keys() == drawn[task_id].keys()  # the ball once, not as box too
        for label, mask in got.items():
            assert np.array_equal(mask, drawn[task_id][label])
    for k in range(3):  # the images beside the file, under their file names
        (tmp_path / title).mkdir(exist_ok=True)
        (tmp_path / title / f"i{k}.png").write_bytes((folder / f"i{k}.png").read_bytes())
    data = scenes_from_coco(path, size=(W, H))
    assert data.class_names == ["Ball", "Sky", "Box"] and data.stuff == ["Sky"] and len(data.scenes) == 3

    # the command, from the store with the config file: the same file
    (tmp_path / "config.xml").write_text(CONFIG)
    env = {**os.environ, "XDLABEL_DATABASE_URL": url, "XDLABEL_DATA_DIR": str(tmp_path / "data")}
    env.pop("XDLABEL_LS_URL", None)
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "export", "--project", str(project.id),
                           "--from-store", "--config", str(tmp_path / "config.xml"), "--out",
                           str(tmp_path / "cli.json")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "cli.json").read_text()) == json.loads(json.dumps(live))


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_colliding_file_names_are_made_unique_by_task_id() -> None:
    """Two tasks whose URLs end in the same name; a third of its own. The URL stays in coco_url."""
    urls = {3: "/data/upload/1/x.png", 5: "https://cdn.example.com/a/x.png", 7: "/data/local-files/?d=p/y.png"}
    ball = brush_result(_disk(20, 20, 6), "Ball", "mask", "image")
    tasks = [{"id": t, "data": {"image": u}, "annotations": [{"id": t, "result": [ball]}]} for t, u in urls.items()]
    coco = to_coco(tasks, parse_labeling_config(CONFIG))
    assert [(i["file_name"], i["coco_url"]) for i in coco["images"]] == [
        ("3-x.png", urls[3]), ("5-x.png", urls[5]), ("p/y.png", urls[7])]

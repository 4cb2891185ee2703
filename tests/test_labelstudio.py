"""The Label Studio bridge against a real Label Studio 1.23.2 (its own virtualenv, started once per
run on 127.0.0.1; see tests/conftest.py) and xdlabel under a real uvicorn server.

The model is the reduced X-Decoder; masks are checked pixel for pixel against what the predictor
computes for the same image, so the tests hold whatever weights it has.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from sqlalchemy import select

from annotator.client import LabelStudioClient, LabelStudioUnavailable
from annotator.convert import brush_result, polygon_results, result_to_mask
from annotator.export import tasks_from_store, to_coco, to_pngs
from annotator.labeling import parse_labeling_config
from annotator.localserver import LocalLabelStudio
from annotator.outbox import Outbox, Outgoing, enqueue
from annotator.project import PrelabelOptions, prelabel_project
from index.db import make_engine, make_session_factory, upgrade
from index.models import Annotation, Job, LabelStudioDelivery
from tests.conftest import Server, make_images
from xdecoder import Predictor
from xdecoder.predictor import PredictorSettings
from xdecoder.transforms import read_image
from xdlabel.services import Services
from xdlabel.settings import Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="box" predicted_values="square"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Ball" predicted_values="circle,ball"/></PolygonLabels>
  <TextArea name="caption" toName="image"/>
  <TextArea name="prompt" toName="image" smart="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Ball"/></KeyPointLabels>
</View>"""


def _project(client: LabelStudioClient, server: LocalLabelStudio, images: list[Path],
             title: str) -> tuple[int, list[int]]:
    """A project whose tasks point at local files served by Label Studio (with its auth)."""
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    folder = server.files_root / title
    folder.mkdir(parents=True)
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    tasks = [{"data": {"image": f"/data/local-files/?d={title}/{p.name}"}} for p in images]
    imported = client.sdk.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    return project.id, list(imported.task_ids)


@pytest.fixture(scope="module")
def predictor(parity_model) -> Predictor:  # type: ignore[no-untyped-def]
    return Predictor(parity_model, settings=PredictorSettings(short_side=128, caption_steps=8))


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'xdlabel.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def _predictions_by_task(client: LabelStudioClient, project_id: int, version: str) -> dict[int, list[dict]]:
    return {t["id"]: [p for p in t["predictions"] if p["model_version"] == version]
            for t in client.tasks(project_id)}


def test_labeling_config_is_read_from_a_real_project(ls_client: LabelStudioClient) -> None:
    project = ls_client.sdk.projects.create(title="config check", label_config=CONFIG)
    config = parse_labeling_config(ls_client.project(project.id)["label_config"], thresholds={"box": 0.9})
    assert config.image == "image" and config.image_key == "image" and config.caption == "caption"
    assert config.prompts == {"circle": "Ball", "ball": "Ball", "square": "box", "background": "background"}
    assert config.stuff == {"background"} and config.task == "panoptic"
    assert [(t.kind, t.from_name) for t in config.targets] == [("brush", "mask"), ("polygon", "poly")]
    assert [dict(t.thresholds) for t in config.targets] == [{"Ball": 0.5, "box": 0.9, "background": 0.5},
                                                            {"Ball": 0.5}]
    assert parse_labeling_config(CONFIG.replace("BrushLabels", "RectangleLabels")).task == "instance"
    with pytest.raises(ValueError, match="no <Image>"):
        parse_labeling_config("<View><Text name='t' value='$t'/></View>")


def test_push_reads_images_from_label_studio_and_predictions_decode_to_the_exact_pixels(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, predictor: Predictor, sessions,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    images = make_images(tmp_path / "photos", 5)
    project_id, task_ids = _project(ls_client, label_studio, images, "push")
    # a task whose file is missing: recorded, the rest go on
    broken = ls_client.sdk.projects.import_tasks(id=project_id, return_task_ids=True, request=[
        {"data": {"image": "/data/local-files/?d=push/missing.png"}}]).task_ids[0]
    options = PrelabelOptions(batch_size=2, task="semantic", default_threshold=0.0)
    report = prelabel_project(predictor, ls_client, sessions, project_id, "xd-test-1", options)
    assert report.predicted == 5 and list(report.failed) == [broken] and report.delivery.delivered == 5
    assert report.delivery.requests == 1  # bulk: one request for the whole project
    assert ls_client.project(project_id)["model_version"] == "xd-test-1"  # the editor pre-fills them

    stored = _predictions_by_task(ls_client, project_id, "xd-test-1")
    config = parse_labeling_config(CONFIG, "semantic", 0.0)
    for task_id, path in zip(task_ids, images, strict=True):
        (prediction,) = stored[task_id]
        # independent recomputation: the predictor's semantic map of the same image
        semantic = predictor.semantic(predictor.encode(read_image(path.read_bytes())[0]), config.class_names)[0]
        expected: dict[str, np.ndarray] = {}
        for k in np.unique(semantic.label_map):
            label = config.prompts[config.class_names[k]]
            expected[label] = expected.get(label, False) | (semantic.label_map == k)
        brushes = {r["value"]["brushlabels"][0]: r for r in prediction["result"] if r["type"] == "brushlabels"}
        assert brushes.keys() == expected.keys()
        for label, result in brushes.items():
            assert np.array_equal(result_to_mask(result), expected[label]), label
            assert 0.0 <= result["score"] <= 1.0
        # Ball's tool is the brush (BrushLabels holds it): no polygon repeats those objects
        assert [r for r in prediction["result"] if r["type"] == "polygonlabels"] == []
        (caption,) = [r for r in prediction["result"] if r["type"] == "textarea"]
        assert caption["from_name"] == "caption" and isinstance(caption["value"]["text"][0], str)
        assert 0.0 <= prediction["score"] <= 1.0  # 1 - uncertainty
    assert stored[broken] == []

    # Idempotent: a second run predicts and sends nothing, Label Studio still holds one per task.
    again = prelabel_project(predictor, ls_client, sessions, project_id, "xd-test-1", options)
    assert again.predicted == 0 and again.skipped == 5 and again.delivery.requests == 0
    assert all(len(v) == 1 for k, v in _predictions_by_task(ls_client, project_id, "xd-test-1").items()
               if k != broken)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_label_studio_crash_mid_push_loses_and_duplicates_nothing(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, database: str, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    project = ls_client.sdk.projects.create(title=f"outage {database}", label_config=CONFIG)
    task_ids = ls_client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"http://127.0.0.1:9/{i}.png"}} for i in range(300)]).task_ids
    masks = {t: np.random.default_rng(t).random((24, 32)) > 0.5 for t in task_ids}
    with sessions() as session:
        assert enqueue(session, ls_client.url, [Outgoing(project.id, t, {
            "result": [brush_result(masks[t], "Ball", "mask", "image", 0.5)], "score": 0.5,
            "model_version": "outage-v1"}) for t in task_ids]) == 300
        session.commit()
    outbox = Outbox(sessions, ls_client, chunk_size=5)  # 60 requests: the kill lands mid-push
    reports = []
    pusher = threading.Thread(target=lambda: reports.append(outbox.deliver()))
    pusher.start()
    deadline = time.monotonic() + 60
    while outbox.counts().get("delivered", 0) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    label_studio.stop(sig=9)  # a crash, possibly in the middle of a request
    pusher.join(60)
    (first,) = reports
    assert first.error and "not reachable" in first.error and 0 < first.pending < 300
    label_studio.start()
    second = outbox.deliver(wait=30)
    assert second.error is None and second.pending == 0
    assert first.delivered + second.delivered == 300
    stored = _predictions_by_task(ls_client, project.id, "outage-v1")
    assert sorted(stored) == sorted(task_ids)
    for task_id, predictions in stored.items():
        assert len(predictions) == 1, f"task {task_id} holds {len(predictions)} predictions"
        assert np.array_equal(result_to_mask(predictions[0]["result"][0]), masks[task_id])
    with sessions() as session:  # enqueuing the same predictions again adds nothing
        assert enqueue(session, ls_client.url, [Outgoing(project.id, task_ids[0], {
            "result": [], "model_version": "outage-v1"})]) == 0
        states = set(session.scalars(select(LabelStudioDelivery.state)))
    assert states == {"delivered"}
    engine.dispose()


def test_a_dead_label_studio_gives_a_clear_error(predictor: Predictor, sessions) -> None:  # type: ignore[no-untyped-def]
    dead = LabelStudioClient("http://127.0.0.1:9", "token")
    with pytest.raises(LabelStudioUnavailable, match="not reachable"):
        prelabel_project(predictor, dead, sessions, 1, "v")


# -- ML backend and webhooks ---------------------------------------------------------------------------

@pytest.fixture
def backend(label_studio: LocalLabelStudio, tmp_path: Path) -> Iterator[dict[str, Any]]:
    # No Label Studio URL or token configured: the backend reads images with what /setup tells it.
    settings = Settings(data_dir=tmp_path / "data", short_side=128, ml_backend_password="s3cret",
                        ml_train_in_server=False)  # START_TRAINING queues a job for a worker
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    with Server(services) as url:
        yield {"url": url, "services": services}
    services.engine.dispose()


def test_ml_backend_called_by_label_studio(backend: dict[str, Any], ls_client: LabelStudioClient,
                                           label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    services: Services = backend["services"]
    base = backend["url"] + "/ml"
    assert httpx.get(base + "/health").status_code == 401
    assert httpx.get(base + "/health", auth=("xdlabel", "wrong")).status_code == 401
    images = make_images(tmp_path / "photos", 3)
    project_id, task_ids = _project(ls_client, label_studio, images, "backend")
    backend_id = ls_client.register_ml_backend(project_id, base, "xdlabel", "s3cret")
    version = services.model_version_name

    # "Retrieve predictions" in the data manager: one /predict for the selected tasks, stored by LS.
    ls_client.sdk.actions.create(id="retrieve_tasks_predictions", project=project_id,
                                 selected_items={"all": False, "included": task_ids})
    stored = _predictions_by_task(ls_client, project_id, version)
    assert all(len(stored[t]) == 1 for t in task_ids)
    for task_id in task_ids:
        result = stored[task_id][0]["result"]
        assert all(r["original_width"] == 160 and r["original_height"] == 120 for r in result if "value" in r
                   and r["type"] != "textarea")
        assert [r["from_name"] for r in result if r["type"] == "textarea"] == ["caption"]

    # Interactive: a typed phrase gives the referring mask X-Decoder computes for it.
    raw = ls_client.sdk.ml.with_raw_response.predict_interactive(id=backend_id, task=task_ids[0], context={
        "result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["the ball"]},
                    "original_width": 160, "original_height": 120}]})
    answer = raw.response.json()["data"]
    (region,) = answer["result"]
    predictor = services.predictor
    grounded = predictor.ground(predictor.encode(read_image(images[0].read_bytes())[0]), ["the ball"])[0][0]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Ball"]
    assert np.array_equal(result_to_mask(region), grounded.mask)
    # A click picks the best predicted region under it: a click where the model is surest of the ball
    # (an edge pixel of its mask may lie under no predicted region).
    ys, xs = (np.array([v]) for v in np.unravel_index(np.argmax(np.where(grounded.mask, grounded.logits, -np.inf)),
                                                     grounded.mask.shape))
    click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 160,
             "original_height": 120, "value": {"x": (xs[0] + 0.5) / 1.6, "y": (ys[0] + 0.5) / 1.2, "width": 0.6,
                                              "keypointlabels": ["Ball"]}, "is_positive": True}
    raw = ls_client.sdk.ml.with_raw_response.predict_interactive(id=backend_id, task=task_ids[0],
                                                                 context={"result": [click]})
    (picked,) = raw.response.json()["data"]["result"]
    assert picked["value"]["brushlabels"] == ["Ball"] and result_to_mask(picked)[ys[0], xs[0]]
    # A box picks the predicted region that overlaps it most.
    x0, y0, x1, y1 = 20, 30, 100, 90
    box = {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": 160,
           "original_height": 120, "value": {"x": x0 / 1.6, "y": y0 / 1.2, "width": (x1 - x0) / 1.6,
                                              "height": (y1 - y0) / 1.2, "rotation": 0, "rectanglelabels": ["box"]}}
    raw = ls_client.sdk.ml.with_raw_response.predict_interactive(id=backend_id, task=task_ids[0],
                                                                 context={"result": [box]})
    (boxed,) = raw.response.json()["data"]["result"]
    assert boxed["value"]["brushlabels"] == ["box"] and result_to_mask(boxed)[y0:y1, x0:x1].any()

    # Webhooks: annotations stored as they are created, updated and deleted; training queued.
    mask = np.zeros((120, 160), bool)
    mask[30:70, 40:100] = True
    created = ls_client.sdk.annotations.create(id=task_ids[1], result=[
        brush_result(mask, "box", "mask", "image"),
        {"type": "textarea", "from_name": "caption", "to_name": "image", "value": {"text": ["a box"]}}])
    with services.sessions() as session:
        row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == created.id))
        assert row is not None and row.ls_task_id == task_ids[1] and row.ls_project_id == project_id
        assert np.array_equal(result_to_mask(row.payload["result"][0]), mask)
        assert row.task_data["image"].endswith(images[1].name)
    ls_client.sdk.annotations.update(id=created.id, result=polygon_results(mask, "Ball", "poly", "image"))
    with services.sessions() as session:
        row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == created.id))
        assert row.action == "ANNOTATION_UPDATED" and row.payload["result"][0]["type"] == "polygonlabels"
    ls_client.sdk.annotations.delete(id=created.id)
    with services.sessions() as session:
        row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == created.id))
        assert row.deleted_at is not None
    ls_client.sdk.ml.train(id=backend_id)
    with services.sessions() as session:
        job = session.scalar(select(Job).where(Job.kind == "finetune"))
        assert job is not None and job.params["ls_project"] == project_id and job.state == "queued"

    versions = httpx.get(base + "/versions", auth=("xdlabel", "s3cret")).json()["versions"]
    assert version in versions


def test_export_round_trip(ls_client: LabelStudioClient, label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    images = make_images(tmp_path / "photos", 2)
    project_id, task_ids = _project(ls_client, label_studio, images, "export")
    rng = np.random.default_rng(1)
    drawn: dict[int, dict[str, np.ndarray]] = {}
    for task_id in task_ids:
        ball, box = np.zeros((120, 160), bool), np.zeros((120, 160), bool)
        x, y = (int(v) for v in rng.integers(10, 80, 2))
        ball[y:y + 30, x:x + 30] = True
        box[5:15, 100:150] = True
        box[8:12, 110:120] = False  # a hole
        drawn[task_id] = {"Ball": ball, "box": box}
        ls_client.sdk.annotations.create(id=task_id, result=[
            brush_result(ball, "Ball", "mask", "image"), brush_result(box, "box", "mask", "image"),
            {"type": "textarea", "from_name": "caption", "to_name": "image", "value": {"text": [f"task {task_id}"]}}])
    config = parse_labeling_config(ls_client.project(project_id)["label_config"])
    tasks = list(ls_client.tasks(project_id))
    coco = to_coco(tasks, config)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    loaded = COCO(str(path))  # pycocotools reads it as any COCO file
    names = {c["id"]: c["name"] for c in loaded.loadCats(loaded.getCatIds())}
    assert sorted(names.values()) == ["Ball", "background", "box"]
    for task_id in task_ids:
        anns = loaded.loadAnns(loaded.getAnnIds(imgIds=[task_id]))
        assert {names[a["category_id"]]: loaded.annToMask(a).astype(bool) for a in anns}.keys() == {"Ball", "box"}
        for a in anns:
            assert np.array_equal(loaded.annToMask(a).astype(bool), drawn[task_id][names[a["category_id"]]])
    assert sorted(c["caption"] for c in coco["captions"]) == sorted(f"task {t}" for t in task_ids)

    pngs = to_pngs(tasks, tmp_path / "png", config)
    categories = json.loads((tmp_path / "png" / "categories.json").read_text())
    for png in pngs:
        task_id = int(png.name.split("-")[1])
        label_map = np.asarray(Image.open(png))
        for cid, label in categories.items():
            assert np.array_equal(label_map == int(cid), drawn[task_id].get(label, np.zeros((120, 160), bool)))

    # Label Studio JSON: imported into a new project, the annotations come back the same.
    copy = ls_client.sdk.projects.create(title="export copy", label_config=CONFIG)
    ls_client.sdk.projects.import_tasks(id=copy.id, request=[
        {"data": t["data"], "annotations": [{"result": a["result"]} for a in t["annotations"]]} for t in tasks])
    again = to_coco(list(ls_client.tasks(copy.id)), config)
    assert [a["segmentation"] for a in again["annotations"]] == [a["segmentation"] for a in coco["annotations"]]


def test_export_from_stored_webhook_annotations(sessions) -> None:  # type: ignore[no-untyped-def]
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    with sessions() as session:
        session.add(Annotation(ls_annotation_id=7, ls_task_id=3, ls_project_id=1, action="ANNOTATION_CREATED",
                               task_data={"image": "/data/x.png"},
                               payload={"id": 7, "result": [brush_result(mask, "box", "mask", "image")]}))
        session.add(Annotation(ls_annotation_id=8, ls_task_id=4, ls_project_id=1, action="ANNOTATIONS_DELETED",
                               payload={"id": 8, "result": []}, deleted_at=datetime.now(UTC)))
        session.commit()
        tasks = tasks_from_store(session, 1)
    assert [t["id"] for t in tasks] == [3]
    coco = to_coco(tasks)
    assert coco["categories"] == [{"id": 1, "name": "box", "supercategory": "", "isthing": 1}]
    assert coco["annotations"][0]["area"] == int(mask.sum())
    assert (coco["images"][0]["file_name"], coco["images"][0]["coco_url"]) == ("x.png", "/data/x.png")


def test_cli_prelabel_export_and_connect(ls_client: LabelStudioClient, label_studio: LocalLabelStudio,
                                         tmp_path: Path) -> None:
    """The commands a user runs, as processes: prelabel a project, export it, register the backend."""
    import os
    import subprocess
    import sys

    images = make_images(tmp_path / "photos", 2)
    project_id, task_ids = _project(ls_client, label_studio, images, "cli")
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_SHORT_SIDE": "128", "XDLABEL_LS_TASK": "semantic",
           "XDLABEL_LS_SCORE_THRESHOLD": "0"}

    def xdlabel(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "xdlabel.cli", *args, "--json"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    report = xdlabel("prelabel", "--project", str(project_id))
    assert report["predicted"] == 2 and report["delivered"] == 2 and report["pending"] == 0
    exported = xdlabel("export", "--project", str(project_id), "--predictions", "--out", str(tmp_path / "p.json"))
    coco = json.loads((tmp_path / "p.json").read_text())
    assert exported["written"] == len(coco["annotations"]) > 0
    assert {a["image_id"] for a in coco["annotations"]} == set(task_ids)
    assert all(0 <= a["score"] <= 1 for a in coco["annotations"])
    xdlabel("export", "--project", str(project_id), "--format", "json", "--out", str(tmp_path / "ls.json"))
    assert [t["id"] for t in json.loads((tmp_path / "ls.json").read_text())] == task_ids

    env["XDLABEL_ML_BACKEND_PASSWORD"] = "pw"
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "labelstudio", "connect", "--project",
                           str(project_id), "--url", "http://127.0.0.1:9/ml"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "error:" in done.stderr  # nothing listens there: refused, said clearly


def test_a_prediction_label_studio_refuses_is_set_aside_and_the_rest_delivered(
        ls_client: LabelStudioClient, sessions) -> None:  # type: ignore[no-untyped-def]
    project = ls_client.sdk.projects.create(title="refused", label_config=CONFIG)
    task_ids = ls_client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"http://127.0.0.1:9/{i}.png"}} for i in range(6)]).task_ids
    deleted = task_ids[2]
    ls_client.sdk.tasks.delete(id=str(deleted))
    mask = np.eye(8, dtype=bool)
    with sessions() as session:
        enqueue(session, ls_client.url, [Outgoing(project.id, t, {
            "result": [brush_result(mask, "Ball", "mask", "image")], "model_version": "r1"}) for t in task_ids])
        session.commit()
    report = Outbox(sessions, ls_client).deliver()
    assert (report.delivered, report.failed, report.pending) == (5, 1, 0)
    with sessions() as session:
        failed = session.scalar(select(LabelStudioDelivery).where(LabelStudioDelivery.state == "failed"))
    assert failed.task_id == deleted and "400" in failed.error
    stored = _predictions_by_task(ls_client, project.id, "r1")
    assert sorted(stored) == sorted(set(task_ids) - {deleted}) and all(len(v) == 1 for v in stored.values())


def test_finetune_from_a_label_studio_project(ls_client: LabelStudioClient, label_studio: LocalLabelStudio,
                                             tmp_path: Path) -> None:
    """`xdlabel train --from-labelstudio` (a process) and a START_TRAINING job run by a worker both read
    the project's annotations and images from Label Studio and report held-out metrics before/after."""
    import os
    import subprocess
    import sys

    from tests.test_finetune import synthetic_tasks
    from xdlabel.jobs import submit, work

    size = (64, 48)
    tasks, pixels = synthetic_tasks(4, seed=5, size=size, names={"circle": "Ball", "square": "box"})
    folder = label_studio.files_root / "finetune"
    folder.mkdir()
    for task_id, image in pixels.items():
        Image.fromarray(image).save(folder / f"{task_id}.png")
    project = ls_client.sdk.projects.create(title="finetune", label_config=CONFIG)
    ls_client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    ls_client.sdk.projects.import_tasks(id=project.id, request=[
        {"data": {"image": f"/data/local-files/?d=finetune/{t['id']}.png"},
         "annotations": [{"result": t["annotations"][0]["result"]}]} for t in tasks])
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "train", "--from-labelstudio", str(project.id),
                           "--out", str(tmp_path / "ft"), "--steps", "3", "--width", "64", "--height", "48",
                           "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["train_scenes"] == 3 and report["heldout_scenes"] == 1 and report["skipped"] == {}
    assert {"miou", "pq", "iou/Ball"} <= report["before"].keys() and report["after"].keys() == report["before"].keys()
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["classes"] == ["Ball", "box", "background"] and len(meta["training_data_sha256"]) == 64
    assert (report["model_version"] is not None) == report["improved"]
    # The project exported to COCO is training data too: its images are read back through Label Studio.
    cli = [sys.executable, "-m", "xdlabel.cli"]
    subprocess.run([*cli, "export", "--project", str(project.id), "--out", str(tmp_path / "coco.json")], env=env,
                   check=True, capture_output=True, timeout=120)
    done = subprocess.run([*cli, "train", "--coco", str(tmp_path / "coco.json"), "--out", str(tmp_path / "ft-coco"),
                           "--steps", "2", "--width", "64", "--height", "48", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from_coco = json.loads(done.stdout)
    assert from_coco["train_scenes"] == 3 and from_coco["heldout_scenes"] == 1 and from_coco["skipped"] == {}
    assert from_coco["before"] == report["before"]  # the same scenes, the same starting model

    settings = Settings(data_dir=tmp_path / "worker", ls_url=label_studio.url, ls_token=label_studio.token)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    with services.sessions() as session:
        job = submit(session, "finetune", {"ls_project": project.id, "steps": 2, "width": 64, "height": 48})
    assert work(services, once=True) == 1
    with services.sessions() as session:
        finished = session.get(Job, job.id)
        assert finished.state == "done", finished.error
        assert finished.done == 4
    assert (tmp_path / "worker" / "finetune" / f"job-{job.id}" / "model.safetensors").is_file()
    services.engine.dispose()


def test_ingest_a_label_studio_project_and_push_its_prelabels(ls_client: LabelStudioClient,
                                                              label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    """`xdlabel ingest labelstudio://P`: one model pass per image gives the index entries and the
    project's pre-labels, which go back to the same tasks through the outbox."""
    import os
    import subprocess
    import sys

    images = make_images(tmp_path / "photos", 3)
    project_id, task_ids = _project(ls_client, label_studio, images, "ingest")
    missing = ls_client.sdk.projects.import_tasks(id=project_id, return_task_ids=True, request=[
        {"data": {"image": "/data/local-files/?d=ingest/missing.png"}}]).task_ids[0]
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_SHORT_SIDE": "128", "XDLABEL_LS_TASK": "semantic",
           "XDLABEL_LS_SCORE_THRESHOLD": "0"}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "ingest", f"labelstudio://{project_id}",
                           "--dataset", "from-ls", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["added"] == 3
    assert list(summary["failed"]) == [f"labelstudio://{project_id}/{missing}"]
    assert summary["labelstudio"] == {"delivered": 3, "pending": 0, "failed": 0, "error": None}
    settings = Settings(data_dir=tmp_path / "data", short_side=128)  # the version name covers the short side
    services = Services(settings)
    version = services.model_version_name
    stored = _predictions_by_task(ls_client, project_id, version)
    assert all(len(stored[t]) == 1 for t in task_ids) and stored[missing] == []
    with services.sessions() as session:
        rows = list(session.scalars(select(LabelStudioDelivery)))
        assert sorted(r.task_id for r in rows) == sorted(task_ids) and all(r.image_id for r in rows)
        from index.models import Image as ImageRow

        metas = [i.meta for i in session.scalars(select(ImageRow).where(ImageRow.status == "done"))]
        assert sorted(m["ls_task"] for m in metas) == sorted(task_ids)
    services.engine.dispose()


def test_the_main_job_writes_a_label_studio_import_and_pushes_it(ls_client: LabelStudioClient,
                                                                 label_studio: LocalLabelStudio,
                                                                 tmp_path: Path) -> None:
    """`xdlabel demo` (the README's first command) as a process, with a Label Studio configured."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDLABEL_LS_URL": label_studio.url, "XDLABEL_LS_TOKEN": label_studio.token}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "demo", "--out", str(tmp_path / "demo")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "demo"
    searches = json.loads((out / "search_results.json").read_text())
    assert all(len(hits) == 3 for hits in searches.values())
    assert len(list((out / "overlays").glob("*.png"))) == 12
    tasks = json.loads((out / "labelstudio" / "tasks.json").read_text())
    config = parse_labeling_config((out / "labelstudio" / "labeling-config.xml").read_text())
    assert len(tasks) == 12 and config.caption == "caption"
    for task in tasks:
        image = Image.open(out / task["data"]["image"].split("?d=")[1])
        for result in task["predictions"][0]["result"]:
            if result["type"] == "brushlabels":
                assert result_to_mask(result).shape == (image.height, image.width)
                assert result["value"]["brushlabels"][0] in config.prompts.values()
    project_id = int(done.stdout.split("/projects/")[1].split()[0])
    stored = list(ls_client.tasks(project_id))
    assert [t["predictions"][0]["result"] for t in stored] == [t["predictions"][0]["result"] for t in tasks]

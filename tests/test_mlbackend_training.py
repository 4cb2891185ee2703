"""Training from Label Studio's "Start training" against a real Label Studio 1.23.2: with no worker
running, the ML backend's own server runs the fine-tune and reports its held-out decision; once a
model is served, /setup answers its version and Label Studio stamps the next predictions with it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio
from index.db import upgrade
from index.models import Job
from tests.conftest import Server
from tests.test_finetune import synthetic_tasks
from xdlabel.api.ml_training import WORKER, load_predictor
from xdlabel.services import Services
from xdlabel.settings import BUNDLED_CHECKPOINT, Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle"/>
    <Label value="box" predicted_values="square"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <TextArea name="caption" toName="image"/>
</View>"""
AUTH = ("xdlabel", "s3cret")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[dict[str, Any]]:
    # No worker anywhere, and no Label Studio URL or token: only what /setup tells the backend.
    settings = Settings(data_dir=tmp_path / "data", short_side=48, caption_steps=2, ml_backend_password=AUTH[1])
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    server = Server(services)
    with server as url:
        yield {"url": url + "/ml", "services": services, "connections": server.server.config.app.state.ls_connections}
    services.engine.dispose()


def _annotated_project(client: LabelStudioClient, server: LocalLabelStudio, title: str, n: int) -> tuple[int, list]:
    tasks, pixels = synthetic_tasks(n, seed=5, size=(64, 48), names={"circle": "Ball", "square": "box"})
    folder = server.files_root / title
    folder.mkdir()
    for task_id, image in pixels.items():
        Image.fromarray(image).save(folder / f"{task_id}.png")
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    imported = client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={title}/{t['id']}.png"},
         "annotations": [{"result": t["annotations"][0]["result"]}]} for t in tasks])
    return project.id, list(imported.task_ids)


def _connect(client: LabelStudioClient, project: int, url: str, extra: Any = None) -> int:
    return int(client.call(client.sdk.ml.create, project=project, url=url, title="xdlabel", is_interactive=True,
                           auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1],
                           extra_params=extra).id)


def test_start_training_runs_in_the_server_with_no_worker(backend: dict[str, Any], ls_client: LabelStudioClient,
                                                          label_studio: LocalLabelStudio) -> None:
    services: Services = backend["services"]
    project, _ = _annotated_project(ls_client, label_studio, "train-here", 8)
    train = {"steps": 2, "width": 64, "height": 48, "holdout_every": 4}
    backend_id = _connect(ls_client, project, backend["url"], {"train": train})
    ls_client.sdk.ml.train(id=backend_id)  # Label Studio posts START_TRAINING to /ml/webhook
    deadline = time.monotonic() + 120
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        import httpx

        status = httpx.get(backend["url"] + "/training", auth=AUTH).json()
        if status.get("state") not in (None, "none", "running"):
            break
        time.sleep(0.5)
    assert status["state"] == "done", status
    with services.sessions() as session:
        job = session.get(Job, status["job"])
        assert job is not None and job.state == "done" and job.worker == WORKER
        assert job.params["ls_project"] == project and job.params["steps"] == 2
    report = status["report"]
    assert report["train_scenes"] == 6 and report["heldout_scenes"] == 2
    # Two held-out images cannot decide: nothing registered, the served version unchanged.
    assert report["decision"].startswith("not decided") and not report["improved"]
    assert report["model_version"] is None and report["interval"] is not None
    assert backend["connections"].version(services) == services.model_version_name


def test_a_served_fine_tune_is_the_version_label_studio_sees(backend: dict[str, Any], ls_client: LabelStudioClient,
                                                             label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    services: Services = backend["services"]
    project, task_ids = _annotated_project(ls_client, label_studio, "served", 2)
    backend_id = _connect(ls_client, project, backend["url"])
    before = services.model_version_name
    assert ls_client.sdk.ml.get(id=backend_id).model_version == before
    # A registered fine-tune (here: the bundled weights saved again, so another file and version).
    checkpoint = tmp_path / "ft.safetensors"
    save_file(load_file(str(BUNDLED_CHECKPOINT)), str(checkpoint), metadata={"fine_tuned": "test"})
    backend["connections"].serve(load_predictor(services, str(checkpoint)), "parity-finetuned-test", str(checkpoint))
    ls_client.sdk.actions.create(id="retrieve_tasks_predictions", project=project,
                                 selected_items={"all": False, "included": task_ids})
    assert ls_client.sdk.ml.get(id=backend_id).model_version == "parity-finetuned-test"
    versions = {p["model_version"] for t in ls_client.tasks(project) for p in t["predictions"]}
    assert versions == {"parity-finetuned-test"}
    # The next fine-tune starts from what is served.
    assert backend["connections"].checkpoint(services) == str(checkpoint)

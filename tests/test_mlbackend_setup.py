"""The ML backend's connection against a real Label Studio 1.23.2: connected the way the UI's
Connect dialog does it (no header added by xdlabel's client), the webhook Label Studio creates
without auth is fixed by /setup itself, refusals carry their reason, and the dialog's
``extra_params`` act as per-project settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from annotator.client import LabelStudioClient
from annotator.convert import brush_result, result_to_mask
from annotator.localserver import LocalLabelStudio
from index.db import upgrade
from index.models import Annotation
from tests.conftest import Server, make_images
from xdlabel.api.ml_setup import ProjectParams, parse_extra_params
from xdlabel.services import Services
from xdlabel.settings import Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <TextArea name="caption" toName="image"/>
</View>"""
AUTH = ("xdlabel", "s3cret")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[dict[str, Any]]:
    # No Label Studio URL or token configured: only what /setup tells the backend.
    settings = Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2, ml_backend_password=AUTH[1])
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    with Server(services) as url:
        yield {"url": url + "/ml", "services": services}
    services.engine.dispose()


def _project(client: LabelStudioClient, server: LocalLabelStudio, tmp_path: Path, title: str, n: int = 2
             ) -> tuple[int, list[int]]:
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    folder = server.files_root / title
    folder.mkdir(parents=True)
    for path in make_images(tmp_path / title, n):
        (folder / path.name).write_bytes(path.read_bytes())
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    tasks = [{"data": {"image": f"/data/local-files/?d={title}/img{i}.png"}} for i in range(n)]
    return project.id, list(client.sdk.projects.import_tasks(id=project.id, request=tasks,
                                                             return_task_ids=True).task_ids)


def _connect_like_the_ui(client: LabelStudioClient, project: int, url: str, extra: Any = None) -> int:
    """What the Connect dialog sends: Label Studio creates the backend's webhook itself, without auth."""
    backend = client.call(client.sdk.ml.create, project=project, url=url, title="xdlabel", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1],
                          extra_params=extra)
    return int(backend.id)


def _wait(condition: Any, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_ui_connected_backend_fixes_its_webhook_and_stores_annotations(
        backend: dict[str, Any], ls_client: LabelStudioClient, label_studio: LocalLabelStudio, tmp_path: Path
        ) -> None:
    services: Services = backend["services"]
    project, task_ids = _project(ls_client, label_studio, tmp_path, "ui-connect")
    _connect_like_the_ui(ls_client, project, backend["url"])
    hook_url = backend["url"] + "/webhook"
    # Label Studio made the webhook without auth; /setup (called again after it saved the backend)
    # gives it the basic auth header in the background.
    hooks = _wait(lambda: [h for h in ls_client.sdk.webhooks.list(project=str(project))
                           if h.url == hook_url and (h.headers or {}).get("Authorization")])
    assert len(hooks) == 1 and hooks[0].headers["Authorization"].startswith("Basic ")
    mask = np.zeros((120, 160), bool)
    mask[20:60, 30:90] = True
    created = ls_client.sdk.annotations.create(id=task_ids[0], result=[brush_result(mask, "Ball", "mask", "image")])
    with services.sessions() as session:  # the webhook is synchronous in Label Studio without Redis
        row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == created.id))
        assert row is not None and row.ls_project_id == project
        assert np.array_equal(result_to_mask(row.payload["result"][0]), mask)


def test_a_webhook_without_auth_is_told_what_to_set(backend: dict[str, Any]) -> None:
    answer = httpx.post(backend["url"] + "/webhook", json={"action": "ANNOTATION_CREATED"})
    assert answer.status_code == 401
    message = answer.json()["error"]["message"]
    assert "Authorization: Basic" in message and "XDLABEL_ML_BACKEND_USER" in message


def test_setup_refusals_carry_their_reason_in_the_body_and_the_log(
        backend: dict[str, Any], ls_client: LabelStudioClient, caplog: pytest.LogCaptureFixture) -> None:
    cases = [({"task": "bogus"}, "extra_params.task"), ({"threshold": 2}, "extra_params.threshold"),
             ({"colour": "red"}, "unknown keys ['colour']"), ("{not json", "not JSON"),
             ({"thresholds": {"Ball": "high"}}, "extra_params.thresholds")]
    body = {"project": "1.1", "schema": CONFIG, "hostname": "http://127.0.0.1:9", "access_token": "x"}
    for extra, reason in cases:
        with caplog.at_level(logging.WARNING, logger="xdlabel.api.ml_setup"):
            caplog.clear()
            answer = httpx.post(backend["url"] + "/setup", auth=AUTH, json={**body, "extra_params": extra})
        assert answer.status_code == 400, extra
        assert reason in answer.json()["error"]["message"]
        assert any(reason in r.getMessage() for r in caplog.records), extra
    bad_config = httpx.post(backend["url"] + "/setup", auth=AUTH, json={**body, "schema": "<View>"})
    assert bad_config.status_code == 400 and bad_config.json()["error"]["message"]
    # Label Studio shows only the status; its refusal of the connection still happens.
    project = ls_client.sdk.projects.create(title="refused", label_config=CONFIG)
    with caplog.at_level(logging.WARNING, logger="xdlabel.api.ml_setup"):
        with pytest.raises(Exception, match="400"):
            _connect_like_the_ui(ls_client, project.id, backend["url"], {"task": "bogus"})
    assert any("extra_params.task" in r.getMessage() for r in caplog.records)


def test_extra_params_are_per_project_settings(backend: dict[str, Any], ls_client: LabelStudioClient,
                                               label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    """The same images in two projects: a threshold of 1.0 in one project's extra_params leaves only
    the caption; the other project keeps its regions."""
    version = backend["services"].model_version_name
    strict, strict_tasks = _project(ls_client, label_studio, tmp_path, "strict")
    loose, loose_tasks = _project(ls_client, label_studio, tmp_path, "loose")
    _connect_like_the_ui(ls_client, strict, backend["url"], {"threshold": 1.0, "task": "semantic"})
    _connect_like_the_ui(ls_client, loose, backend["url"], {"threshold": 0.0, "task": "semantic"})
    for project, tasks in ((strict, strict_tasks), (loose, loose_tasks)):
        ls_client.sdk.actions.create(id="retrieve_tasks_predictions", project=project,
                                     selected_items={"all": False, "included": tasks})
    types = {}
    for project in (strict, loose):
        found = [p for t in ls_client.tasks(project) for p in t["predictions"] if p["model_version"] == version]
        assert len(found) == 2
        types[project] = [sorted(r["type"] for r in p["result"]) for p in found]
    assert types[strict] == [["textarea"], ["textarea"]]
    assert all("brushlabels" in t for t in types[loose])


@pytest.mark.parametrize("seed", range(3))
def test_extra_params_parse_what_they_say(seed: int) -> None:
    rng = np.random.default_rng(seed)
    threshold = float(rng.uniform(0, 1))
    labels = {f"L{k}": float(rng.uniform(0, 1)) for k in range(int(rng.integers(0, 4)))}
    params = parse_extra_params({"task": "instance", "threshold": threshold, "thresholds": labels,
                                 "label_mapping": {" grass ": "Vegetation"}})
    assert params == ProjectParams("instance", threshold, labels, {"grass": "Vegetation"})
    assert parse_extra_params(None) == parse_extra_params("") == ProjectParams()

"""/ml/predict: predictions that never run past Label Studio's limit and never come twice.

Label Studio sends every selected task of "Retrieve predictions" in one request and gives up
after ML_TIMEOUT_PREDICT (100 s by default). Each task is first claimed in the store (see
ml_store): a task whose prediction is stored is answered from it, one held by another caller
(a batch running while the task is opened) is left out, the rest are computed a chunk at a time
while the time budget allows. What is left when the budget is spent goes to the server's own
background pool, which computes it and delivers it through the outbox. A task left out of the
answer gets an empty list, for which Label Studio stores nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from annotator.client import LabelStudioClient
from annotator.labeling import LabelingConfig
from annotator.outbox import Outbox
from annotator.prelabel import PrelabelSettings, predictions
from annotator.project import task_image_url
from xdecoder.transforms import read_image
from xdlabel.api.auth import ServicesDep
from xdlabel.api.ml_interactive import interactive_answer
from xdlabel.api.ml_setup import Connections, ConnectionsDep, label_mapping, labeling_config, project_id, refuse
from xdlabel.api.ml_store import Target, claim, finish, release
from xdlabel.api.schemas import Text
from xdlabel.services import Services

log = logging.getLogger(__name__)
router = APIRouter()
PREDICT_CHUNK = 4  # tasks read, decoded and encoded together: memory follows the chunk, not the request
DELIVER_EVERY = 5.0  # seconds between the background pre-label's deliveries
OWNER = f"{socket.gethostname()}:{os.getpid()}"


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: Text | None = None
    label_config: Text | None = None
    params: dict[str, Any] = Field(default_factory=dict)


def read_images(client: LabelStudioClient, tasks: list[dict[str, Any]], config: LabelingConfig,
                services: Services) -> list[Any]:
    s = services.settings

    def read(task: dict[str, Any]) -> Any:
        try:
            data = client.read_file(task_image_url(task, config), s.max_image_bytes)
            return read_image(data, s.max_image_pixels)[0]
        except Exception as err:  # noqa: BLE001 - reported per task; the batch goes on
            log.warning("task %s: %s", task.get("id"), err)
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(read, tasks))


def compute(services: Services, connections: Connections, client: LabelStudioClient, config: LabelingConfig,
            tasks: list[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    """One prediction per task (an empty result for an image that cannot be read)."""
    settings = PrelabelSettings(polygon_tolerance=services.settings.ls_polygon_tolerance)
    out: list[dict[str, Any]] = [{"result": [], "score": 0.0, "model_version": version} for _ in tasks]
    images = read_images(client, tasks, config, services)
    readable = [k for k, image in enumerate(images) if image is not None]
    if readable:
        with services.model_lock:  # one chunk at a time: the model's memory is sized for one
            predictor = connections.predictor(services)
            features = predictor.encode([images[k] for k in readable])
            made = predictions(predictor, features, config, version, settings)
        for k, prediction in zip(readable, made, strict=True):
            out[k] = prediction
    return out


def _has_version(task: dict[str, Any], version: str) -> bool:
    return any(isinstance(p, dict) and p.get("model_version") == version for p in task.get("predictions") or [])


def _task_id(task: dict[str, Any]) -> int | None:
    value = task.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@router.post("/predict")
def predict(body: PredictRequest, services: ServicesDep, connections: ConnectionsDep) -> dict[str, Any]:
    """One answer per task, in order: a prediction, or an empty list (Label Studio stores
    nothing) for a task stored already, held elsewhere or left to the background."""
    if not body.label_config:
        raise refuse(400, "label_config is missing")
    config = labeling_config(services, body.label_config, connections.params(body.project))
    client = connections.client(services, body.project)
    version = connections.version(services)
    raw_context = body.params.get("context")
    context: dict[str, Any] = raw_context if isinstance(raw_context, dict) else {}
    if context.get("result"):  # interactive: one answer, for the first task; never stored
        answer = interactive_answer(services, connections, client, config, body.tasks, context, version,
                                    label_mapping(services, connections.params(body.project)))
        return {"results": [answer, *([] for _ in body.tasks[1:])]}
    project = project_id(body.project)
    if project is None:
        raise refuse(400, f"project {body.project!r} is not Label Studio's '<id>.<created>'")
    s = services.settings
    deadline = time.monotonic() + s.ml_predict_budget
    target = Target(client.url, project, version)
    results: list[Any] = [[] for _ in body.tasks]
    by_id: dict[int, int] = {}
    for k, task in enumerate(body.tasks):
        task_id = _task_id(task)
        if task_id is None:
            raise refuse(422, f"task {k} has no integer id")
        if not _has_version(task, version):  # Label Studio holds this one's prediction already
            by_id.setdefault(task_id, k)
    todo = list(by_id)
    owner = f"{OWNER}:{uuid.uuid4().hex[:12]}"
    answer_for = s.ml_timeout_predict + 30.0  # how long a handed-out answer is held as in flight
    while todo:
        n = connections.pace.fits(deadline)
        if n == 0:
            break
        chunk, todo = todo[:n], todo[n:]
        claims = claim(services.sessions, target, chunk, owner, answer_for, answer_for)
        for task_id, stored in claims.stored.items():
            results[by_id[task_id]] = stored
        if not claims.compute:
            continue
        started = time.monotonic()
        tasks = [body.tasks[by_id[t]] for t in claims.compute]
        try:
            made = compute(services, connections, client, config, tasks, version)
        except BaseException:
            release(services.sessions, target, owner, claims.compute)
            raise
        connections.pace.record(time.monotonic() - started, len(tasks))
        late = time.monotonic() > deadline  # Label Studio may have given up: the outbox delivers these
        done = dict(zip(claims.compute, made, strict=True))
        for task_id in finish(services.sessions, target, owner, done, None if late else answer_for):
            if not late:
                results[by_id[task_id]] = done[task_id]
        if late:
            connections.pool.submit(deliver, services, client)
    if todo:
        log.info("project %s: %d of %d tasks left to the background pre-label (budget %.0f s)",
                 project, len(todo), len(body.tasks), s.ml_predict_budget)
        rest = [body.tasks[by_id[t]] for t in todo]
        connections.pool.submit(prelabel_rest, services, connections, client, config, target, rest)
    return {"results": results}


def prelabel_rest(services: Services, connections: Connections, client: LabelStudioClient, config: LabelingConfig,
                  target: Target, tasks: list[dict[str, Any]]) -> None:
    """Computes what a /predict had no time for and delivers it through the outbox, a chunk at a
    time (a task claimed meanwhile by another caller is skipped)."""
    owner = f"{OWNER}:bg:{uuid.uuid4().hex[:12]}"
    by_id = {t["id"]: t for t in tasks}
    ids = list(by_id)
    delivered_at = time.monotonic()
    try:
        for start in range(0, len(ids), PREDICT_CHUNK):
            claims = claim(services.sessions, target, ids[start:start + PREDICT_CHUNK], owner, 600.0, None)
            if not claims.compute:
                continue
            try:
                made = compute(services, connections, client, config, [by_id[t] for t in claims.compute],
                               target.model_version)
            except BaseException:
                release(services.sessions, target, owner, claims.compute)
                raise
            finish(services.sessions, target, owner, dict(zip(claims.compute, made, strict=True)), None)
            if time.monotonic() - delivered_at > DELIVER_EVERY:  # in bulk, yet visible as it goes
                deliver(services, client)
                delivered_at = time.monotonic()
        deliver(services, client)
    except Exception:  # noqa: BLE001 - logged; the tasks not done are asked for again by Label Studio
        log.exception("background pre-label of project %s failed", target.project_id)


def deliver(services: Services, client: LabelStudioClient) -> None:
    report = Outbox(services.sessions, client, chunk_size=services.settings.ls_chunk_size).deliver()
    if report.error:
        log.warning("outbox delivery to %s stopped: %s (%d still queued)", client.url, report.error, report.pending)

"""Label Studio's ML backend protocol at /ml: register ``http://<host>:<port>/ml`` in a project.

Label Studio calls /health and /setup before every batch (1 s and 3 s timeouts), so both answer
without touching the model; /predict encodes each image once for the whole batch; /webhook stores
human annotations and queues training, answering at once (Label Studio waits 1 s and never retries).
Every route needs HTTP basic auth (``XDLABEL_ML_BACKEND_USER`` / ``_PASSWORD``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from annotator.client import LabelStudioClient
from annotator.labeling import LabelingConfig, parse_labeling_config
from annotator.prelabel import PrelabelSettings, interactive, predictions
from annotator.project import task_image_url
from index.models import Annotation, ModelVersion
from xdecoder.transforms import read_image
from xdlabel.api.auth import ServicesDep
from xdlabel.api.schemas import Text
from xdlabel.jobs import submit
from xdlabel.services import Services
from xdlabel.settings import Settings

log = logging.getLogger(__name__)
basic = HTTPBasic(auto_error=False)


async def check_basic_auth(services: ServicesDep,  # async: /health answers without a worker thread
                     credentials: Annotated[HTTPBasicCredentials | None, Depends(basic)]) -> None:
    password = services.settings.ml_backend_password
    if not password:
        raise HTTPException(503, "the ML backend is off: set XDLABEL_ML_BACKEND_PASSWORD to enable it")
    if credentials is None:
        raise HTTPException(401, "basic auth required", headers={"WWW-Authenticate": "Basic"})
    user_ok = secrets.compare_digest(credentials.username.encode(), services.settings.ml_backend_user.encode())
    password_ok = secrets.compare_digest(credentials.password.encode(), password.encode())
    if not (user_ok and password_ok):
        raise HTTPException(401, "wrong user or password", headers={"WWW-Authenticate": "Basic"})


router = APIRouter(prefix="/ml", tags=["label studio ml backend"], dependencies=[Depends(check_basic_auth)])


class SetupRequest(BaseModel):
    project: Text = ""
    schema_: Text = Field("", alias="schema")
    hostname: Text | None = None
    access_token: Text | None = None
    extra_params: Any = None


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: Text | None = None
    label_config: Text | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Connections:
    """Per Label Studio project (as /setup names it: "<id>.<created>"), where its files are read."""

    def __init__(self) -> None:
        self._by_project: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def remember(self, project: str, hostname: str | None, token: str | None) -> None:
        if hostname and token:
            with self._lock:
                self._by_project[project] = (hostname, token)

    def client(self, services: Services, project: str | None) -> LabelStudioClient:
        settings = services.settings
        if settings.ls_url and settings.ls_token:  # configured: wins over what /setup said
            return _client(settings, settings.ls_url, settings.ls_token)
        with self._lock:
            known = self._by_project.get(project or "")
        if known is None:
            raise HTTPException(400, "no Label Studio connection for this project: set XDLABEL_LS_URL and "
                                     "XDLABEL_LS_TOKEN, or let Label Studio call /setup first")
        return _client(settings, *known)


def _client(settings: Settings, url: str, token: str) -> LabelStudioClient:
    return _cached_client(url, token, settings.allow_private_urls, settings.fetch_timeout)


@lru_cache(maxsize=32)
def _cached_client(url: str, token: str, allow_private: bool, max_seconds: float) -> LabelStudioClient:
    # One client per server and token: it keeps its connection pool and refreshed access token.
    return LabelStudioClient(url, token, allow_private=allow_private, max_seconds=max_seconds)


@lru_cache(maxsize=64)
def _config(xml: str, task: str, default: float, thresholds: tuple[tuple[str, float], ...]) -> LabelingConfig:
    return parse_labeling_config(xml, task, default, dict(thresholds))


def labeling_config(services: Services, xml: str) -> LabelingConfig:
    s = services.settings
    try:
        return _config(xml, s.ls_task, s.ls_score_threshold, tuple(sorted(s.ls_thresholds.items())))
    except ValueError as err:
        raise HTTPException(400, str(err)) from None


def connections_of(request: Request) -> Connections:
    return request.app.state.ls_connections  # type: ignore[no-any-return]


ConnectionsDep = Annotated[Connections, Depends(connections_of)]


def _warm_up(services: Services) -> None:
    """Load the model in the background so that the first /predict does not wait for it."""
    def load() -> None:
        try:
            services.predictor  # noqa: B018 - loads it
        except Exception:  # noqa: BLE001 - /predict reports the error
            log.exception("model warm-up failed")

    if "predictor" not in services.__dict__:
        threading.Thread(target=load, daemon=True).start()


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:  # on the event loop: never queued behind model work
    return {"status": "UP", "model_class": "X-Decoder", "model_loaded": "predictor" in services.__dict__}


@router.post("/setup")
def setup(body: SetupRequest, services: ServicesDep, connections: ConnectionsDep) -> dict[str, str]:
    labeling_config(services, body.schema_)  # a config we cannot serve is refused at registration
    connections.remember(body.project, body.hostname, body.access_token)
    _warm_up(services)
    return {"model_version": services.model_version_name}


@router.get("/versions")
def versions(services: ServicesDep) -> dict[str, list[str]]:
    with services.sessions() as session:
        names = list(session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)))
    current = services.model_version_name
    return {"versions": names if current in names else [*names, current]}


def _read_images(client: LabelStudioClient, tasks: list[dict[str, Any]], config: LabelingConfig,
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


PREDICT_CHUNK = 4  # tasks read, decoded and encoded together: memory follows the chunk, not the request


@router.post("/predict")
def predict(body: PredictRequest, services: ServicesDep, connections: ConnectionsDep) -> dict[str, Any]:
    """One result per task, in order; a task whose image cannot be read gets an empty result. Tasks
    go PREDICT_CHUNK at a time (read, encode, predict, dropped) and the model lock is taken per
    chunk, so searches interleave with a long batch."""
    if not body.label_config:
        raise HTTPException(400, "label_config is missing")
    config = labeling_config(services, body.label_config)
    client = connections.client(services, body.project)
    version = services.model_version_name
    settings = PrelabelSettings(polygon_tolerance=services.settings.ls_polygon_tolerance)
    empty = {"result": [], "score": 0.0, "model_version": version}
    results: list[dict[str, Any]] = [dict(empty) for _ in body.tasks]
    raw_context = body.params.get("context")
    context: dict[str, Any] = raw_context if isinstance(raw_context, dict) else {}
    interactive_mode = bool(context.get("result"))
    for start in range(0, len(body.tasks), PREDICT_CHUNK):
        images = _read_images(client, body.tasks[start:start + PREDICT_CHUNK], config, services)
        readable = [k for k, image in enumerate(images) if image is not None]
        if not readable:
            continue
        with services.model_lock:  # one chunk at a time: the model's memory is sized for one
            predictor = services.predictor
            features = predictor.encode([images[k] for k in readable])
            if interactive_mode:
                out = [interactive(predictor, features, config, context, version, settings)]
            else:
                out = predictions(predictor, features, config, version, settings)
        del images, features
        for k, prediction in zip(readable, out, strict=False):
            results[start + k] = prediction
        if interactive_mode:  # one answer: for the first readable task
            break
    return {"results": results}


_ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
# Label Studio's ids are 32-bit serials; larger ones cannot be stored (PostgreSQL INTEGER columns).
LsId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # Label Studio sends many more fields; kept in the payload


class ProjectRef(_Loose):
    id: LsId | None = None
    label_config: Text = ""


class TaskRef(_Loose):
    id: LsId | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class AnnotationRef(_Loose):
    id: LsId | None = None


class AnnotationIn(_Loose):
    id: LsId
    task: LsId | TaskRef | None = None
    project: LsId | ProjectRef | None = None


class WebhookIn(_Loose):
    """A webhook body as Label Studio sends it: project and task as objects (or bare ids)."""

    action: str = ""
    project: ProjectRef | LsId | None = None
    task: TaskRef | LsId | None = None
    annotation: AnnotationIn | None = None
    annotations: list[AnnotationRef] = Field(default_factory=list, max_length=100_000)


def _ref_id(ref: _Loose | int | None) -> int | None:
    return ref if isinstance(ref, int) or ref is None else getattr(ref, "id", None)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _webhook_body(body: dict[str, Any]) -> WebhookIn:
    """The body checked: JSON the databases can store (valid Unicode, no NUL) and the expected types."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise HTTPException(422, "the webhook body holds text that is not valid Unicode") from None
    if _has_nul(body):  # PostgreSQL's JSON refuses it
        raise HTTPException(422, "the webhook body holds NUL characters")
    try:
        return WebhookIn.model_validate(body)
    except ValidationError as err:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                 for e in err.errors(include_url=False, include_input=False)[:10]]
        raise HTTPException(422, "invalid webhook body: " + "; ".join(parts)) from None


@router.post("/webhook")
def webhook(body: dict[str, Any], services: ServicesDep) -> dict[str, Any]:
    """Stores human annotations (upserted by Label Studio's id; deletions kept as deleted) and
    queues a fine-tuning job on START_TRAINING. Only SQL writes here: Label Studio waits 1 s."""
    parsed = _webhook_body(body)
    action = parsed.action
    project_id = _ref_id(parsed.project)
    with services.sessions() as session:
        if action in _ANNOTATION_ACTIONS:
            annotation = parsed.annotation
            if annotation is None:
                raise HTTPException(422, f"{action} without an annotation id")
            row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == annotation.id))
            if row is None:
                row = Annotation(ls_annotation_id=annotation.id)
                session.add(row)
            task_data = parsed.task.data if isinstance(parsed.task, TaskRef) else {}
            row.ls_task_id = _ref_id(annotation.task) or _ref_id(parsed.task)
            row.ls_project_id = _ref_id(annotation.project) or project_id
            row.payload, row.task_data, row.action = body["annotation"], task_data, action
            row.deleted_at = None
            session.commit()
            return {"status": "stored", "annotation": annotation.id}
        if action == "ANNOTATIONS_DELETED":
            ids = [a.id for a in parsed.annotations if a.id is not None]
            now = datetime.now(UTC)
            for row in session.scalars(select(Annotation).where(Annotation.ls_annotation_id.in_(ids))):
                row.deleted_at, row.action = now, action
            session.commit()
            return {"status": "deleted", "annotations": ids}
        if action == "START_TRAINING":
            config = parsed.project.label_config if isinstance(parsed.project, ProjectRef) else ""
            job = submit(session, "finetune", {"ls_project": project_id, "label_config_sha": _sha(config)})
            return {"status": "queued", "job": job.id}
    return {"status": "ignored", "action": action}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]

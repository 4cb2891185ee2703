"""The ML backend's /webhook: human annotations stored as Label Studio sends them (upserted by its
id; deletions kept as deleted), and START_TRAINING. Only SQL writes here: Label Studio waits 1 s."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from index.models import Annotation
from xdlabel.api.auth import ServicesDep
from xdlabel.api.ml_setup import ConnectionsDep
from xdlabel.api.ml_setup import project_id as project_of
from xdlabel.api.ml_training import train_here
from xdlabel.api.schemas import Text
from xdlabel.jobs import submit

router = APIRouter()


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
def webhook(body: dict[str, Any], services: ServicesDep, connections: ConnectionsDep) -> dict[str, Any]:
    """Stores human annotations (upserted by Label Studio's id; deletions kept as deleted) and
    queues a fine-tuning job on START_TRAINING (run in this server's pool unless
    XDLABEL_ML_TRAIN_IN_SERVER=false). Only SQL writes here: Label Studio waits 1 s."""
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
            train = next((p.train for k, p in connections.known_params() if project_of(k) == project_id), {})
            job = submit(session, "finetune", {**train, "ls_project": project_id, "label_config_sha": _sha(config),
                                               "init": connections.checkpoint(services)})
            if not services.settings.ml_train_in_server:
                return {"status": "queued", "job": job.id,
                        "message": f"fine-tuning job {job.id} queued: an `xdlabel worker` runs it"}
            connections.pool.submit(train_here, services, connections, job.id, project_id)
            return {"status": "training", "job": job.id,
                    "message": f"fine-tuning job {job.id} runs in the ML backend's server; GET /ml/training "
                               "shows its held-out result, and a better model is served once registered"}
    return {"status": "ignored", "action": action}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]

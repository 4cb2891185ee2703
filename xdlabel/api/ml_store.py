"""Which /ml/predict caller may hand out a task's prediction: one row per (server, project, task,
model version) in the outbox table, so a prediction goes to Label Studio once whatever the path
(a "Retrieve predictions" batch, a task opened meanwhile, the background pre-label, the CLI push).

Besides the outbox's own states a row may be ``computing`` (a caller holds it under a lease while
the model runs) or ``answered`` (handed out in a /predict response: Label Studio stores it from
there, so the outbox leaves it alone). Every change is a compare-and-set on the row's state and
lease, so two callers never both win a task, in one process or in several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from index.models import LabelStudioDelivery as Row
from index.models import utcnow

ANSWERABLE = ("pending", "failed", "answered", "delivered")  # a stored result Label Studio asks for again


@dataclass
class Claims:
    compute: list[int] = field(default_factory=list)  # tasks this caller now computes
    stored: dict[int, dict[str, Any]] = field(default_factory=dict)  # tasks answered from the store


@dataclass(frozen=True)
class Target:
    server: str
    project_id: int
    model_version: str


def _free(now: Any) -> Any:
    return or_(Row.lease_expires_at.is_(None), Row.lease_expires_at < now)


def _where(target: Target, task_ids: Sequence[int]) -> Any:
    return (Row.server == target.server, Row.project_id == target.project_id,
            Row.model_version == target.model_version, Row.task_id.in_(list(task_ids)))


def claim(sessions: sessionmaker[Session], target: Target, task_ids: Sequence[int], owner: str,
          compute_seconds: float, answer_seconds: float | None) -> Claims:
    """Claims tasks for ``owner``: those with no row (or whose computing caller's lease lapsed) to
    compute, under a lease of ``compute_seconds``; with ``answer_seconds``, those with a stored
    result nobody holds are taken to answer, held that long (Label Studio is storing the answer).
    Tasks held by another caller are in neither list."""
    claims = Claims()
    if not task_ids:
        return claims
    now = utcnow()
    with sessions() as session:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        rows = [{"server": target.server, "project_id": target.project_id, "task_id": t,
                 "model_version": target.model_version, "result": [], "state": "computing", "attempts": 0,
                 "created_at": now, "lease_owner": owner, "lease_expires_at": now + timedelta(seconds=compute_seconds)}
                for t in sorted(set(task_ids))]
        inserted = session.scalars(insert(Row).values(rows).on_conflict_do_nothing(
            index_elements=["server", "project_id", "task_id", "model_version"]).returning(Row.task_id)).all()
        claims.compute += inserted
        rest = sorted(set(task_ids) - set(inserted))
        if rest:
            claims.compute += session.scalars(
                update(Row).where(*_where(target, rest), Row.state == "computing", _free(now))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=compute_seconds))
                .returning(Row.task_id).execution_options(synchronize_session=False)).all()
        if rest and answer_seconds is not None:
            for task_id, result, score in session.execute(
                    update(Row).where(*_where(target, rest), Row.state.in_(ANSWERABLE), _free(now))
                    .values(state="answered", lease_owner=owner, error=None,
                            lease_expires_at=now + timedelta(seconds=answer_seconds))
                    .returning(Row.task_id, Row.result, Row.score).execution_options(synchronize_session=False)):
                claims.stored[task_id] = {"result": result, "score": score, "model_version": target.model_version}
        session.commit()
    return claims


def finish(sessions: sessionmaker[Session], target: Target, owner: str, predictions: dict[int, dict[str, Any]],
           answered_seconds: float | None) -> list[int]:
    """Stores computed predictions of tasks ``owner`` holds: ``answered`` (held ``answered_seconds``)
    when they go out in the response, else ``pending`` for the outbox. Returns the tasks written."""
    now = utcnow()
    written: list[int] = []
    with sessions() as session:
        for task_id, prediction in sorted(predictions.items()):
            values: dict[str, Any] = {"result": prediction["result"], "score": prediction.get("score"),
                                      "error": None}
            if answered_seconds is None:
                values.update(state="pending", lease_owner=None, lease_expires_at=None)
            else:
                values.update(state="answered", lease_expires_at=now + timedelta(seconds=answered_seconds))
            written += session.scalars(
                update(Row).where(*_where(target, [task_id]), Row.lease_owner == owner, Row.state == "computing")
                .values(**values).returning(Row.task_id).execution_options(synchronize_session=False)).all()
        session.commit()
    return written


def release(sessions: sessionmaker[Session], target: Target, owner: str, task_ids: Sequence[int]) -> None:
    """Gives up computing rows (nothing was computed): the next caller may claim them at once."""
    if not task_ids:
        return
    with sessions() as session:
        session.execute(update(Row).where(*_where(target, task_ids), Row.lease_owner == owner,
                                          Row.state == "computing").values(lease_owner=None, lease_expires_at=None)
                        .execution_options(synchronize_session=False))
        session.commit()


def states(sessions: sessionmaker[Session], target: Target) -> dict[int, str]:
    with sessions() as session:
        return dict(session.execute(select(Row.task_id, Row.state).where(
            Row.server == target.server, Row.project_id == target.project_id,
            Row.model_version == target.model_version)).tuples().all())

"""The durable outbox of predictions for Label Studio (SQL table ``ls_deliveries``).

Predictions are written to SQL first, in the same transaction as the work that made them, then
delivered in bulk (one request per chunk). A row is marked ``sending`` before its request goes out;
if the process dies or Label Studio drops the connection, the next delivery asks Label Studio
which of those tasks already hold a prediction of that model version, so a retry never
duplicates and nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from annotator.client import LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from index.models import LabelStudioDelivery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    project_id: int
    task_id: int
    prediction: dict[str, Any]  # {"result", "score", "model_version"}
    image_id: int | None = None


def enqueue(session: Session, server: str, items: Iterable[Outgoing]) -> int:
    """Adds rows for predictions not queued before (same server, project, task, model version);
    the caller commits. Returns how many were new."""
    added = 0
    for item in items:
        version = item.prediction["model_version"]
        exists = session.scalar(select(LabelStudioDelivery.id).where(
            LabelStudioDelivery.server == server, LabelStudioDelivery.project_id == item.project_id,
            LabelStudioDelivery.task_id == item.task_id, LabelStudioDelivery.model_version == version))
        if exists is None:
            session.add(LabelStudioDelivery(server=server, project_id=item.project_id, task_id=item.task_id,
                                            model_version=version, result=item.prediction["result"],
                                            score=item.prediction.get("score"), image_id=item.image_id))
            added += 1
    return added


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    pending: int = 0
    requests: int = 0
    error: str | None = None  # why delivery stopped early (Label Studio unreachable)


def _payload(row: LabelStudioDelivery) -> dict[str, Any]:
    return {"task": row.task_id, "result": row.result, "score": row.score, "model_version": row.model_version}


def _already_there(client: LabelStudioClient, rows: list[LabelStudioDelivery]) -> set[int]:
    """Ids of rows whose prediction Label Studio holds already (a request whose answer was lost)."""
    found = set()
    for row in rows:
        if any(p.get("model_version") == row.model_version for p in client.predictions_of(row.task_id)):
            found.add(row.id)
    return found


class Outbox:
    def __init__(self, sessions: sessionmaker[Session], client: LabelStudioClient, chunk_size: int = 200) -> None:
        self.sessions = sessions
        self.client = client
        self.chunk_size = chunk_size

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(LabelStudioDelivery.state, func.count()).where(
                LabelStudioDelivery.server == self.client.url).group_by(LabelStudioDelivery.state))
            return {state: int(n) for state, n in rows}

    def deliver(self, wait: float = 0.0, retry_every: float = 2.0) -> DeliveryReport:
        """Delivers everything pending. While Label Studio is unreachable it retries for up to
        ``wait`` seconds, then returns with the rest still queued (``report.error`` says why)."""
        report = DeliveryReport()
        deadline = time.monotonic() + wait
        while True:
            try:
                self._deliver_all(report)
                report.error = None
                break
            except LabelStudioUnavailable as err:
                report.error = str(err)
                if time.monotonic() + retry_every > deadline:
                    break
                log.warning("%s; retrying in %.0f s", err, retry_every)
                time.sleep(retry_every)
        report.pending = sum(n for s, n in self.counts().items() if s in ("pending", "sending"))
        return report

    def _deliver_all(self, report: DeliveryReport) -> None:
        versions: set[tuple[int, str]] = set()
        while True:
            with self.sessions() as session:
                rows = list(session.scalars(
                    select(LabelStudioDelivery)
                    .where(LabelStudioDelivery.server == self.client.url,
                           LabelStudioDelivery.state.in_(("pending", "sending")))
                    .order_by(LabelStudioDelivery.id).limit(self.chunk_size)))
                if not rows:
                    break
                uncertain = [r for r in rows if r.state == "sending"]
                done = _already_there(self.client, uncertain) if uncertain else set()
                self._mark_delivered(session, [r for r in rows if r.id in done], report)
                rows = [r for r in rows if r.id not in done]
                for row in rows:
                    row.state, row.attempts = "sending", row.attempts + 1
                session.commit()
                for project_id in sorted({r.project_id for r in rows}):
                    self._send(session, [r for r in rows if r.project_id == project_id], report)
                versions |= {(r.project_id, r.model_version) for r in rows if r.state == "delivered"}
        for project_id, version in sorted(versions):
            try:
                self.client.set_model_version(project_id, version)
            except LabelStudioError as err:  # the project was deleted meanwhile: nothing to pre-fill
                log.warning("project %s: cannot set model_version %r: %s", project_id, version, err.body)

    def _send(self, session: Session, rows: list[LabelStudioDelivery], report: DeliveryReport) -> None:
        try:
            report.requests += 1
            self.client.import_predictions(rows[0].project_id, [_payload(r) for r in rows])
        except LabelStudioError as err:
            if len(rows) == 1:  # a bad row (its task deleted, a result Label Studio refuses)
                rows[0].state, rows[0].error = "failed", str(err)
                report.failed += 1
                session.commit()
                return
            # Find the bad rows by halves; the good ones still go out in bulk.
            half = len(rows) // 2
            self._send(session, rows[:half], report)
            self._send(session, rows[half:], report)
            return
        self._mark_delivered(session, rows, report)

    @staticmethod
    def _mark_delivered(session: Session, rows: list[LabelStudioDelivery], report: DeliveryReport) -> None:
        now = datetime.now(UTC)
        for row in rows:
            row.state, row.delivered_at, row.error = "delivered", now, None
        report.delivered += len(rows)
        session.commit()

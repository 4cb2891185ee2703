"""The durable outbox of predictions for Label Studio (SQL table ``ls_deliveries``).

Predictions are written to SQL first, in the same transaction as the work that made them, then
delivered in bulk (one request per chunk). Any number of deliverers may run at once: each claims a
chunk with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a compare-and-set on SQLite) and
fences every later write by its lease token, so a row is sent by one deliverer at a time. A row is
marked ``sending`` before its request goes out; if the deliverer dies or Label Studio drops the
connection, whoever holds the row next asks Label Studio which of those tasks already hold a
prediction of that model version, so a retry never duplicates and nothing is lost.

Answers are sorted by kind: 401/403 stop delivery at once (rows stay queued); no answer, 429 and
5xx are retried with backoff a bounded number of times, then delivery stops with the rows queued;
any other refusal is the row's own (its task deleted, its result refused): the chunk is split until
the refused rows are alone, those are marked ``failed`` with the reason, the rest are delivered.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from annotator.client import (
    LabelStudioAuthError,
    LabelStudioClient,
    LabelStudioError,
    LabelStudioUnavailable,
    is_unavailable,
)
from index.models import LabelStudioDelivery, utcnow
from index.retry import is_transient_db_error, retry

log = logging.getLogger(__name__)
Row = LabelStudioDelivery
OPEN = ("pending", "sending")
_TARGET = ["server", "project_id", "task_id", "model_version"]


@dataclass(frozen=True)
class Outgoing:
    project_id: int
    task_id: int
    prediction: dict[str, Any]  # {"result", "score", "model_version"}
    image_id: int | None = None
    replace: bool = False  # a forced redo: replaces a queued or delivered prediction of this version


def enqueue(session: Session, server: str, items: Iterable[Outgoing]) -> int:
    """Adds rows for predictions not queued before (same server, project, task, model version);
    any number of enqueuers may race (``ON CONFLICT DO NOTHING``). An item with ``replace`` puts
    its row back to pending with the new result, and Label Studio's earlier prediction of that
    version is deleted before it is sent. The caller commits. Returns how many rows were written."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    written = 0
    # In one order everywhere: two transactions taking the same keys in opposite orders deadlock.
    for item in sorted(items, key=lambda i: (i.project_id, i.task_id, i.prediction["model_version"])):
        values = {"server": server, "project_id": item.project_id, "task_id": item.task_id,
                  "model_version": item.prediction["model_version"], "result": item.prediction["result"],
                  "score": item.prediction.get("score"), "image_id": item.image_id, "state": "pending",
                  "attempts": 0, "created_at": utcnow(), "replace_existing": item.replace}
        statement = insert(Row).values(**values)
        if item.replace:
            # lease_expires_at is kept: a request still out under the old lease ends before anyone
            # else may claim the row, whose old owner can no longer write (the owner is cleared).
            statement = statement.on_conflict_do_update(index_elements=_TARGET, set_={
                "result": values["result"], "score": values["score"], "state": "pending", "error": None,
                "delivered_at": None, "lease_owner": None, "replace_existing": True})
        else:
            statement = statement.on_conflict_do_nothing(index_elements=_TARGET)
        written += len(session.execute(statement.returning(Row.id)).all())
    return written


def requeue(session: Session, server: str | None = None, project_id: int | None = None,
            task_ids: Collection[int] = ()) -> int:
    """Puts failed rows back to pending (all, or a server's, a project's, some tasks'); the caller
    commits. Returns how many."""
    statement = update(Row).where(Row.state == "failed")
    if server is not None:
        statement = statement.where(Row.server == server)
    if project_id is not None:
        statement = statement.where(Row.project_id == project_id)
    if task_ids:
        statement = statement.where(Row.task_id.in_(list(task_ids)))
    statement = statement.values(state="pending", error=None, lease_owner=None, lease_expires_at=None)
    return len(session.execute(statement.returning(Row.id).execution_options(synchronize_session=False)).all())


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    pending: int = 0  # still queued after this run (by anyone)
    requests: int = 0
    error: str | None = None  # why delivery stopped early (Label Studio unreachable, the token refused)
    auth_error: bool = False  # it stopped because the token was refused


def _payload(row: Row) -> dict[str, Any]:
    return {"task": row.task_id, "result": row.result, "score": row.score, "model_version": row.model_version}


def _holds(client: LabelStudioClient, row: Row) -> bool:
    try:  # one try: the whole chunk is what is retried
        found = client.call(client.sdk.predictions.list, task=row.task_id)
        return any(p.model_version == row.model_version for p in found)
    except LabelStudioError:  # the task is gone: the send will fail the row with the reason
        return False


class Outbox:
    """``lease_seconds`` must outlast one request (default: the client's timeout plus 30 s): a row
    whose lease expired while its request was still out could otherwise be checked too early."""

    def __init__(self, sessions: sessionmaker[Session], client: LabelStudioClient, chunk_size: int = 200,
                 lease_seconds: float | None = None, attempts: int = 4, backoff: float = 1.0) -> None:
        self.sessions = sessions
        self.client = client
        self.chunk_size = chunk_size
        self.lease = timedelta(seconds=lease_seconds if lease_seconds is not None else client.timeout + 30)
        self.attempts = attempts  # tries of one chunk while Label Studio is unavailable
        self.backoff = backoff  # the first wait between them (doubling, jittered)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._claims = itertools.count(1)

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(Row.state, func.count()).where(
                Row.server == self.client.url).group_by(Row.state))
            return {state: int(n) for state, n in rows}

    def deliver(self, wait: float = 0.0, retry_every: float = 2.0) -> DeliveryReport:
        """Delivers everything pending, and waits for rows other deliverers hold. While Label
        Studio is unavailable it retries for up to ``wait`` seconds, then returns with the rest
        still queued (``report.error`` says why). A refused token stops it at once."""
        report = DeliveryReport()
        deadline = time.monotonic() + wait
        versions: set[tuple[int, str]] = set()  # (project, model version) delivered, over every try
        while True:
            try:
                self._deliver_all(report, deadline, versions)
                report.error = None
                break
            except LabelStudioAuthError as err:
                report.error, report.auth_error = str(err), True
                break
            except LabelStudioUnavailable as err:
                report.error = str(err)
                if time.monotonic() + retry_every > deadline:
                    break
                log.warning("%s; retrying in %.0f s", err, retry_every)
                time.sleep(retry_every)
        report.pending = sum(n for s, n in self.counts().items() if s in OPEN)
        return report

    # -- claiming --------------------------------------------------------------------------------------

    def _claim(self) -> tuple[str, list[int]]:
        """Leases up to ``chunk_size`` open rows no live lease holds; returns the lease token and
        the ids this deliverer now owns."""
        token = f"{self.owner}:{next(self._claims)}"
        now = utcnow()
        free = or_(Row.lease_expires_at.is_(None), Row.lease_expires_at < now)
        with self.sessions() as session:
            candidates = (select(Row.id).where(Row.server == self.client.url, Row.state.in_(OPEN), free)
                          .order_by(Row.id).limit(self.chunk_size))
            if session.get_bind().dialect.name == "postgresql":
                candidates = candidates.with_for_update(skip_locked=True)
            # One statement: the conditions are checked again on the row as it is when written
            # (compare-and-set), so two deliverers never both own a row.
            owned = session.scalars(
                update(Row).where(Row.id.in_(candidates.scalar_subquery()), Row.state.in_(OPEN), free)
                .values(lease_owner=token, lease_expires_at=now + self.lease).returning(Row.id)
                .execution_options(synchronize_session=False)).all()
            session.commit()
        return token, sorted(owned)

    def _fenced(self, token: str, ids: Iterable[int], **values: Any) -> list[int]:
        """Writes ``values`` on the rows of ``ids`` this lease still owns; returns their ids."""
        ids = list(ids)
        if not ids:
            return []

        def write() -> list[int]:
            with self.sessions() as session:
                done = session.scalars(update(Row).where(Row.id.in_(ids), Row.lease_owner == token)
                                       .values(**values).returning(Row.id)
                                       .execution_options(synchronize_session=False)).all()
                session.commit()
                return list(done)

        done = retry(write, what="outbox write")
        if len(done) < len(ids):
            log.warning("lost the lease of %d outbox rows; their new holder checks them", len(ids) - len(done))
        return done

    def _release(self, token: str, ids: list[int]) -> None:
        """Lets others take the rows at once (a ``sending`` row is checked by whoever does)."""
        try:
            self._fenced(token, ids, lease_owner=None, lease_expires_at=None)
        except Exception as err:  # noqa: BLE001 - the lease then simply expires
            log.warning("could not release outbox rows: %s", err)

    # -- delivering ------------------------------------------------------------------------------------

    def _deliver_all(self, report: DeliveryReport, deadline: float, versions: set[tuple[int, str]]) -> None:
        while True:
            token, ids = retry(self._claim, what="outbox claim")
            if not ids:
                if self._held_by_others() and time.monotonic() < deadline:
                    time.sleep(0.25)  # until they deliver them or their leases expire
                    continue
                break
            try:
                retry(lambda: self._attempt(token, ids, report, versions),  # noqa: B023 - called at once
                      transient=lambda e: is_unavailable(e) or is_transient_db_error(e), attempts=self.attempts,
                      first_wait=self.backoff, max_wait=10 * self.backoff, what="outbox chunk")
            except BaseException:
                self._release(token, ids)
                raise
            self._fenced(token, ids, lease_expires_at=None)
        for project_id, version in sorted(versions):
            try:
                self.client.set_model_version(project_id, version)
            except LabelStudioError as err:  # the project was deleted meanwhile: nothing to pre-fill
                log.warning("project %s: cannot set model_version %r: %s", project_id, version, err.body)

    def _held_by_others(self) -> bool:
        # A lease that expired a moment ago still counts: it may have expired between the empty claim
        # and this check, and the next claim takes its rows over instead of leaving them pending.
        with self.sessions() as session:
            return bool(session.scalar(select(func.count()).select_from(Row).where(
                Row.server == self.client.url, Row.state.in_(OPEN),
                Row.lease_expires_at >= utcnow() - timedelta(seconds=1))))

    def _attempt(self, token: str, ids: list[int], report: DeliveryReport, versions: set[tuple[int, str]]) -> None:
        try:
            self._process(token, ids, report, versions)
        except LabelStudioUnavailable as err:
            self.client.pause(err)  # what Retry-After asked for, before the backoff
            raise

    def _process(self, token: str, ids: list[int], report: DeliveryReport, versions: set[tuple[int, str]]) -> None:
        """One chunk: safe to call again after any failure (what was done is not done twice)."""
        self._fenced(token, ids, lease_expires_at=utcnow() + self.lease)
        with self.sessions() as session:
            rows = list(session.scalars(select(Row).where(Row.id.in_(ids), Row.lease_owner == token,
                                                          Row.state.in_(OPEN)).order_by(Row.id)))
        for row in rows:  # a forced redo: the task's earlier prediction of this version goes first
            if row.replace_existing and row.state == "pending":
                self.client.delete_predictions(row.task_id, row.model_version)
                self._fenced(token, [row.id], replace_existing=False)
        uncertain = [r for r in rows if r.state == "sending"]  # its request was out when it stopped
        there = {r.id for r in uncertain if _holds(self.client, r)}
        self._mark_delivered(token, [r for r in rows if r.id in there], report, versions)
        rows = [r for r in rows if r.id not in there]
        owned = set(self._fenced(token, [r.id for r in rows], state="sending", attempts=Row.attempts + 1,
                                 lease_expires_at=utcnow() + self.lease))
        rows = [r for r in rows if r.id in owned]
        for project_id in sorted({r.project_id for r in rows}):
            self._send(token, [r for r in rows if r.project_id == project_id], report, versions)

    def _send(self, token: str, rows: list[Row], report: DeliveryReport, versions: set[tuple[int, str]]) -> None:
        # Renewed before every request (a chunk being halved makes several): no row is sent after
        # its lease could have passed to another deliverer.
        owned = set(self._fenced(token, [r.id for r in rows], lease_expires_at=utcnow() + self.lease))
        rows = [r for r in rows if r.id in owned]
        if not rows:
            return
        try:
            report.requests += 1
            self.client.import_predictions(rows[0].project_id, [_payload(r) for r in rows])
        except LabelStudioAuthError:
            self._fenced(token, [r.id for r in rows], state="pending")  # refused unread: surely not stored
            raise
        except LabelStudioUnavailable as err:
            if not err.sent:
                self._fenced(token, [r.id for r in rows], state="pending")
            raise
        except LabelStudioError as err:
            if len(rows) == 1:  # a bad row (its task deleted, a result Label Studio refuses)
                report.failed += len(self._fenced(token, [rows[0].id], state="failed", error=str(err)[:2000],
                                                  lease_expires_at=None))
                return
            # Find the bad rows by halves; the good ones still go out in bulk.
            half = len(rows) // 2
            self._send(token, rows[:half], report, versions)
            self._send(token, rows[half:], report, versions)
            return
        self._mark_delivered(token, rows, report, versions)

    def _mark_delivered(self, token: str, rows: list[Row], report: DeliveryReport,
                        versions: set[tuple[int, str]]) -> None:
        done = set(self._fenced(token, [r.id for r in rows], state="delivered", delivered_at=utcnow(),
                                error=None, lease_expires_at=None))
        report.delivered += len(done)
        versions |= {(r.project_id, r.model_version) for r in rows if r.id in done}

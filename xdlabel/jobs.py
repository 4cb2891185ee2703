"""Jobs stored in SQL and run by ``xdlabel worker`` processes under leases.

A worker claims a job by taking a lease on it: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a
compare-and-set UPDATE on SQLite, either way adding 1 to the job's ``lease_token`` (the fencing
token) and setting ``lease_expires_at``. A heartbeat thread renews the lease every third of its
length for the whole job (model load, listing, downloads, fine-tune steps), and every write the
worker makes to the job (progress, the final state) is an UPDATE fenced by its token. When a
worker dies its lease lapses and the next claim takes the job over with a new token, so the dead
(or merely stalled) worker can change nothing any more; the new one resumes where the data stops,
because ingestion skips content already stored. A job left ``cancelling`` by a dead worker is
settled as ``cancelled`` by the next claim.

States: queued -> running -> done | failed | cancelled (via cancelling); a running job goes back
to queued when its worker shuts down (SIGTERM) before it is done.

Lease times are read from one clock: PostgreSQL's (shared by workers on any host), or this
machine's UTC time on SQLite (whose workers all run on this machine).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, DateTime, and_, case, func, literal, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from index.models import Dataset, Image, Job
from index.retry import retry
from xdlabel.services import Services

if TYPE_CHECKING:
    from annotator.client import LabelStudioClient
    from xdlabel.finetune import FinetuneReport

log = logging.getLogger(__name__)
# Job params of a finetune job that set FinetuneOptions (the rest: ls_project, init, width, height).
FINETUNE_PARAMS = ("steps", "batch_size", "lr", "seed", "holdout_every", "min_heldout")
KINDS = ("ingest", "finetune")  # finetune: from Label Studio annotations (queued by START_TRAINING)
MAX_ERRORS = 50
HELD = ("running", "cancelling")  # states in which a job is held by a lease


class Stopped(Exception):  # noqa: N818 - a request, not an error
    """The job was asked to stop (cancelled, lease lost or worker shutting down) between two steps."""


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their (UTC) zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def clock(dialect: str) -> Any:
    """Now, on the clock every lease is measured on."""
    if dialect == "postgresql":
        return func.clock_timestamp(type_=DateTime(timezone=True))
    return now()


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _expired(at: Any) -> Any:
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= at)


def _claimable(at: Any) -> Any:
    return or_(Job.state == "queued", and_(Job.state.in_(HELD), _expired(at)))


def _rows(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


def submit(session: Session, kind: str, params: dict[str, Any]) -> Job:
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; known: {KINDS}")
    if kind == "ingest" and (not params.get("sources") or not params.get("dataset")):
        raise ValueError("an ingest job needs 'sources' (a non-empty list) and 'dataset'")
    job = Job(kind=kind, params=params, state="queued")
    session.add(job)
    session.commit()
    return job


def _claim_once(session: Session, worker: str, lease_seconds: float, job_id: int | None = None
                ) -> tuple[str, int | None]:
    """One round: ('claimed', id), ('settled', id) for a dead worker's cancelling job now cancelled,
    or ('none', None)."""
    dialect = _dialect(session)
    at = clock(dialect)
    query = (select(Job.id, Job.state, Job.lease_token, Job.started_at).where(_claimable(at)).order_by(Job.id))
    if job_id is not None:  # that job only (the ML backend's server runs the training it queued)
        query = query.where(Job.id == job_id)
    try:
        if dialect == "postgresql":  # the row stays locked until the commit; other claimers skip it
            rows = session.execute(query.limit(1).with_for_update(skip_locked=True)).all()
        else:  # SQLite serializes writers: the compare-and-set below decides
            rows = session.execute(query.limit(10)).all()
        for job_id, state, token, started_at in rows:
            if state == "cancelling":
                values: dict[str, Any] = {"state": "cancelled", "finished_at": at, "lease_expires_at": None}
            else:
                values = {"state": "running", "worker": worker, "heartbeat_at": at,
                          "lease_expires_at": at + timedelta(seconds=lease_seconds)}
                if started_at is None:
                    values["started_at"] = at
            won = _rows(session.execute(
                update(Job).where(Job.id == job_id, Job.lease_token == token, _claimable(at))
                .values(lease_token=Job.lease_token + 1, **values)))
            session.commit()
            if won == 1:
                return ("settled" if state == "cancelling" else "claimed"), job_id
        session.commit()
        return "none", None
    except BaseException:
        session.rollback()
        raise


def claim(session: Session, worker: str, lease_seconds: float = 10.0, only: int | None = None) -> Job | None:
    """Take a lease on the oldest claimable job (or on job ``only``): queued, or held by a worker
    whose lease lapsed. Dead workers' cancelling jobs met on the way are settled as cancelled."""
    for _ in range(1000):  # each round settles a job or returns
        outcome, job_id = retry(lambda: _claim_once(session, worker, lease_seconds, only), what="claim")
        if outcome == "none":
            return None
        if outcome == "claimed":
            return session.get(Job, job_id, populate_existing=True)
        log.info("job %s: its worker died while cancelling it; now cancelled", job_id)
    return None


def cancel(session: Session, job_id: int) -> Job | None:
    """A queued job is cancelled at once; a running one is asked to stop after its current batch."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    at = clock(_dialect(session))
    session.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                    .values(state="cancelled", finished_at=at))
    session.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(state="cancelling"))
    session.commit()
    session.refresh(job)
    return job


class Lease:
    """A worker's hold on one claimed job: a heartbeat thread renews it, and every write to the job
    goes through ``write``, fenced by the token it was claimed with. The first write that finds
    another token (the job was taken over) or a final state marks the lease ``lost``."""

    def __init__(self, sessions: sessionmaker[Session], dialect: str, job_id: int, token: int, seconds: float,
                 shutdown: threading.Event | None = None) -> None:
        self.sessions, self.dialect, self.job_id, self.token, self.seconds = sessions, dialect, job_id, token, seconds
        self.shutdown = shutdown or threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def _fence(self) -> Any:
        return and_(Job.id == self.job_id, Job.lease_token == self.token, Job.state.in_(HELD))

    def write(self, **values: Any) -> bool:
        """One fenced UPDATE of the job (transient errors retried); False when the lease is lost."""
        return self._update(values) is not None

    def _update(self, values: dict[str, Any]) -> str | None:
        """The fenced UPDATE; returns the job's state after it, None (and the lease lost) if no row."""
        if self.lost.is_set():
            return None

        def attempt() -> str | None:
            with self.sessions() as session:
                state = session.scalar(update(Job).where(self._fence()).values(**values).returning(Job.state))
                session.commit()
                return state

        state = retry(attempt, what=f"job {self.job_id} write")
        if state is None:
            if not self.lost.is_set():
                log.warning("job %s: lease %d lost (taken over or settled); this worker writes no more",
                            self.job_id, self.token)
            self.lost.set()
        return state

    def renew(self) -> bool:
        at = clock(self.dialect)
        return self.write(heartbeat_at=at, lease_expires_at=at + timedelta(seconds=self.seconds))

    def _beat(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                if not self.renew():
                    return  # lost for good: nothing left to hold
            except Exception:  # noqa: BLE001 - logged; the next beat tries again while the lease may hold
                log.exception("job %s: lease renewal failed; trying again", self.job_id)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        """Asked between steps: stop when the lease is lost, the worker shuts down or the job is cancelled."""
        if self.lost.is_set() or self.shutdown.is_set():
            return True

        def read() -> tuple[str, int] | None:
            with self.sessions() as session:
                row = session.execute(select(Job.state, Job.lease_token).where(Job.id == self.job_id)).first()
                return (row[0], row[1]) if row else None

        row = retry(read, what=f"job {self.job_id} state")
        if row is None or row[1] != self.token or row[0] not in HELD:
            self.lost.set()
            return True
        return row[0] == "cancelling"

    def check(self) -> None:
        if self.should_stop():
            raise Stopped

    def finish(self, state: str, error: str | None = None) -> bool:
        return self.write(state=state, error=error, finished_at=clock(self.dialect), lease_expires_at=None)

    def settle(self) -> str | None:
        """The job stopped before its end: cancelled if that was asked, else back to the queue for
        another worker (released at once, not left to expire). Returns the state, None if lost."""
        at = clock(self.dialect)
        stamp = at if self.dialect == "postgresql" else literal(at, Job.finished_at.type)
        cancelled = Job.state == "cancelling"
        return self._update({"state": case((cancelled, "cancelled"), else_="queued"),
                             "finished_at": case((cancelled, stamp), else_=None), "lease_expires_at": None})


def run_finetune(services: Services, job: Job, lease: Lease, client: LabelStudioClient | None = None,
                 on_report: Callable[[FinetuneReport], None] | None = None) -> str:
    """START_TRAINING from Label Studio: fine-tune the serving checkpoint (``params.init``, else the
    configured one) on the project's annotations received by webhook (or read live when none were)
    under <data_dir>/finetune/job-<id>. ``client``: the ML backend's connection to that server."""
    from pathlib import Path

    from xdlabel.finetune import FinetuneOptions, describe, finetune, labelstudio_data
    from xdlabel.settings import labelstudio_client

    settings, params = services.settings, job.params
    if client is None and (not settings.ls_url or not settings.ls_token):
        raise ValueError("fine-tuning reads images from Label Studio: set XDLABEL_LS_URL and XDLABEL_LS_TOKEN")
    client = client or labelstudio_client(settings)
    project = int(params["ls_project"])
    size = (int(params.get("width", 160)), int(params.get("height", 128)))
    data = labelstudio_data(client, project, size, services.sessions, settings.max_image_bytes)
    if len(data.scenes) < 2:
        lease.check()
        data = labelstudio_data(client, project, size, None, settings.max_image_bytes)
    lease.check()
    options = FinetuneOptions(**{k: type(getattr(FinetuneOptions, k))(v) for k, v in params.items()
                                 if k in FINETUNE_PARAMS})
    out = Path(settings.data_dir) / "finetune" / f"job-{job.id}"
    init = str(params.get("init") or settings.checkpoint)
    report = finetune(settings.model, init, data.scenes, data.class_names, data.stuff, out, options,
                      data_digest=data.digest, sessions=services.sessions,
                      log=lambda _step, _record: lease.check())  # a stop lands between two steps
    log.info("fine-tuning job %s: %s", job.id, describe(report))
    if on_report is not None:
        on_report(report)
    lease.write(total=len(data.scenes), done=len(data.scenes), failed=len(data.skipped),
                errors=[{"uri": f"task {t}", "reason": r} for t, r in list(data.skipped.items())[:MAX_ERRORS]])
    return "done"


def _stored_failures(services: Services, dataset: str, uris: list[str]) -> dict[str, str]:
    """Which of these skipped items are stored as failures (by this run's predecessors, or by
    another process), with their reasons."""

    def read(chunk: list[str]) -> dict[str, str]:
        with services.sessions() as session:
            rows = session.execute(select(Image.uri, Image.error).join(Dataset, Image.dataset_id == Dataset.id)
                                   .where(Dataset.name == dataset, Image.status == "failed", Image.uri.in_(chunk)))
            return {uri: error or "failed in an earlier run" for uri, error in rows}

    found: dict[str, str] = {}
    for start in range(0, len(uris), 500):
        found.update(retry(partial(read, uris[start:start + 500]), what="stored failures"))
    return found


def run_ingest(services: Services, job: Job, lease: Lease) -> str:
    """Ingest the job's sources; a resumed job skips what is stored and counts it again: done for
    stored images, failed for stored failures (with their reasons)."""
    from xdlabel.ingest import IngestPipeline, IngestReport, LabelStudioPush
    from xdlabel.sources import items_from

    params, settings = job.params, services.settings
    # A job submitted over HTTP reads only under the configured source roots, never the data folder.
    roots = settings.source_roots if params.get("restricted") else None
    push = LabelStudioPush.from_settings(settings, services.model_version_name)
    items = items_from(list(params["sources"]), glob=params.get("glob", "**/*"),
                       labelstudio=push.client if push else None, roots=roots, forbidden=[settings.data_dir])
    lease.write(total=len(items), done=0, failed=0, errors=[])
    prior_failures: dict[str, str] = {}  # items skipped because their failure is stored: still failed
    seen = 0

    def progress(report: IngestReport) -> None:
        nonlocal seen
        duplicates = list(report.duplicates)  # one snapshot: the decoding thread appends to it
        prior_failures.update(_stored_failures(services, params["dataset"], duplicates[seen:]))
        seen = len(duplicates)
        failures = {**prior_failures, **report.failed}
        errors = [{"uri": u, "reason": r} for u, r in list(failures.items())[-MAX_ERRORS:]]
        lease.write(done=len(report.added) + len(duplicates) - len(prior_failures), failed=len(failures),
                    errors=errors)

    if lease.lost.is_set() or lease.shutdown.is_set():  # a cancel is looked at after the first batch
        return "stopped"
    report = IngestPipeline(services, params["dataset"], batch_size=int(params.get("batch_size", 4)),
                            tags=params.get("tags", []), progress=progress, should_stop=lease.should_stop,
                            push=push, source_roots=roots, forbidden=[settings.data_dir],
                            outputs=params.get("outputs")).run(items)
    progress(report)
    return "stopped" if report.cancelled else "done"


def run(services: Services, job: Job, *, lease_seconds: float | None = None,
        shutdown: threading.Event | None = None, **finetune_args: Any) -> str:
    """Run a claimed job to its end under its lease; returns the state it was left in ('lost' when
    another worker took it over meanwhile: then this one wrote nothing more). ``finetune_args`` go
    to ``run_finetune``."""
    seconds = lease_seconds or services.settings.job_lease_seconds
    lease = Lease(services.sessions, services.engine.dialect.name, job.id, job.lease_token, seconds, shutdown).start()
    try:
        error = None
        try:
            outcome = run_finetune(services, job, lease, **finetune_args) if job.kind == "finetune" \
                else run_ingest(services, job, lease)
        except Stopped:
            outcome = "stopped"
        except Exception as err:  # noqa: BLE001 - recorded on the job; the worker carries on
            if not lease.lost.is_set():
                log.exception("job %s failed", job.id)
            outcome, error = "failed", f"{type(err).__name__}: {err}"
        if outcome == "stopped":
            state = lease.settle()
        else:
            state = outcome if lease.finish(outcome, error) else None
    finally:
        lease.stop()
    if state is None:
        log.warning("job %s: taken over by another worker; its result is left to that one", job.id)
        return "lost"
    return state


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT ask the worker to stop: it claims nothing more, its job stops after the
    current batch and is released. A second signal acts as usual (the lease then just lapses)."""
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()
        for s in signals:
            signal.signal(s, previous[s])

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, previous[s])


def work(services: Services, *, once: bool = False, poll: float = 2.0, worker: str | None = None,
         lease_seconds: float | None = None, stop: threading.Event | None = None, preload: bool = False) -> int:
    """Claim and run jobs until ``stop`` is set (or, with ``once``, until none is left). Returns jobs run.
    ``preload``: load the model first, so that a job taken over from a dead worker resumes at once."""
    name = worker or f"{socket.gethostname()}:{os.getpid()}"
    seconds = lease_seconds or services.settings.job_lease_seconds
    stop = stop or threading.Event()
    if preload:
        services.model  # noqa: B018 - loads the model and registers its version
    log.info("worker %s: looks for jobs every %.1f s; leases of %.1f s", name, poll, seconds)
    ran = 0
    while not stop.is_set():
        try:
            with services.sessions() as session:
                job = claim(session, name, seconds)
        except Exception:
            if once:
                raise
            log.exception("worker %s: cannot claim; trying again in %.1f s", name, poll)
            stop.wait(poll)
            continue
        if job is None:
            if once:
                break
            stop.wait(poll)
            continue
        log.info("worker %s runs job %s (lease %d)", name, job.id, job.lease_token)
        try:
            log.info("job %s: %s", job.id, run(services, job, lease_seconds=seconds, shutdown=stop))
        except Exception:  # noqa: BLE001 - the database failed past its retries
            # Its lease lapses, so the job is taken over and resumed (by this worker or another).
            log.exception("job %s: could not record its end; it will be taken over", job.id)
            if once:
                raise
        ran += 1
    return ran


def describe(job: Job) -> dict[str, Any]:
    """State, counts, rate and ETA, as GET /v1/jobs/{id} answers."""
    end = aware(job.finished_at) if job.finished_at else now()
    elapsed = (end - aware(job.started_at)).total_seconds() if job.started_at else 0.0
    processed = job.done + job.failed
    rate = processed / elapsed if elapsed > 0 else 0.0
    remaining = (job.total - processed) if job.total is not None else None
    eta = remaining / rate if rate > 0 and remaining is not None and job.state == "running" else None
    return _printable({
        "id": job.id, "kind": job.kind, "state": job.state, "params": job.params, "total": job.total,
        "done": job.done, "failed": job.failed, "images_per_s": round(rate, 3),
        "eta_s": round(eta, 1) if eta is not None else None, "errors": job.errors, "error": job.error,
        "worker": job.worker, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at})


def _printable(value: Any) -> Any:
    """Text a JSON answer can carry: a row stored before lone surrogates were refused shows "?" for them."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value

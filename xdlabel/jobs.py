"""Jobs stored in SQL and run by ``xdlabel worker`` processes.

Claiming is a compare-and-set UPDATE on (id, state, heartbeat), so several workers on
PostgreSQL (or SQLite) never run the same job; a running job whose heartbeat is older than
``stale_after`` is taken over (its worker died) and resumes where its data stops, because
ingestion skips content already stored.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from index.models import Job
from xdlabel.services import Services

log = logging.getLogger(__name__)
KINDS = ("ingest", "finetune")  # finetune: from Label Studio annotations (queued by START_TRAINING)
MAX_ERRORS = 50


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their (UTC) zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def submit(session: Session, kind: str, params: dict[str, Any]) -> Job:
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; known: {KINDS}")
    if kind == "ingest" and (not params.get("sources") or not params.get("dataset")):
        raise ValueError("an ingest job needs 'sources' (a non-empty list) and 'dataset'")
    job = Job(kind=kind, params=params, state="queued")
    session.add(job)
    session.commit()
    return job


def claim(session: Session, worker: str, stale_after: timedelta = timedelta(minutes=2)) -> Job | None:
    """Take the oldest queued job, or a running one whose worker stopped beating."""
    stale = now() - stale_after
    candidates = session.execute(
        select(Job.id, Job.state, Job.heartbeat_at)
        .where(or_(Job.state == "queued", and_(Job.state == "running", Job.heartbeat_at < stale)))
        .order_by(Job.id).limit(10)).all()
    for job_id, state, heartbeat in candidates:
        same = Job.heartbeat_at.is_(None) if heartbeat is None else Job.heartbeat_at == heartbeat
        result = session.execute(update(Job).where(Job.id == job_id, Job.state == state, same)
                                 .values(state="running", worker=worker, heartbeat_at=now(), started_at=now()))
        won = cast(CursorResult[Any], result).rowcount
        session.commit()
        if won == 1:
            return session.get(Job, job_id)
    return None


def cancel(session: Session, job_id: int) -> Job | None:
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", now()
    elif job.state == "running":
        job.state = "cancelling"  # the worker stops after its current batch
    session.commit()
    return job


def run_finetune(services: Services, job: Job) -> str:
    """START_TRAINING from Label Studio: fine-tune the serving checkpoint on the project's
    annotations received by webhook (or read live when none were) under <data_dir>/finetune/job-<id>."""
    from pathlib import Path

    from annotator.client import LabelStudioClient
    from xdlabel.finetune import FinetuneOptions, describe, finetune, labelstudio_data

    settings, params = services.settings, job.params
    if not settings.ls_url or not settings.ls_token:
        raise ValueError("fine-tuning reads images from Label Studio: set XDLABEL_LS_URL and XDLABEL_LS_TOKEN")
    client = LabelStudioClient(settings.ls_url, settings.ls_token)
    project = int(params["ls_project"])
    size = (int(params.get("width", 160)), int(params.get("height", 128)))
    data = labelstudio_data(client, project, size, services.sessions, settings.max_image_bytes)
    if len(data.scenes) < 2:
        data = labelstudio_data(client, project, size, None, settings.max_image_bytes)
    options = FinetuneOptions(steps=int(params.get("steps", 200)), batch_size=int(params.get("batch_size", 4)))
    out = Path(settings.data_dir) / "finetune" / f"job-{job.id}"
    report = finetune(settings.model, settings.checkpoint, data.scenes, data.class_names, data.stuff, out, options,
                      data_digest=data.digest, sessions=services.sessions)
    log.info("fine-tuning job %s: %s", job.id, describe(report))
    with services.sessions() as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            total=len(data.scenes), done=len(data.scenes), failed=len(data.skipped),
            errors=[{"uri": f"task {t}", "reason": r} for t, r in list(data.skipped.items())[:MAX_ERRORS]]))
        session.commit()
    return "done"


def run_ingest(services: Services, job: Job) -> str:
    from xdlabel.ingest import IngestPipeline, IngestReport, LabelStudioPush
    from xdlabel.sources import items_from

    params = job.params
    push = LabelStudioPush.from_settings(services.settings, services.model_version_name)
    items = items_from(list(params["sources"]), glob=params.get("glob", "**/*"),
                       labelstudio=push.client if push else None)
    with services.sessions() as session:
        session.execute(update(Job).where(Job.id == job.id).values(total=len(items), done=0, failed=0))
        session.commit()

    def progress(report: IngestReport) -> None:
        errors = [{"uri": u, "reason": r} for u, r in list(report.failed.items())[-MAX_ERRORS:]]
        with services.sessions() as session:
            session.execute(update(Job).where(Job.id == job.id).values(
                done=len(report.added) + len(report.duplicates), failed=len(report.failed), errors=errors,
                heartbeat_at=now()))
            session.commit()

    def should_stop() -> bool:
        with services.sessions() as session:
            return session.scalar(select(Job.state).where(Job.id == job.id)) == "cancelling"

    report = IngestPipeline(services, params["dataset"], batch_size=int(params.get("batch_size", 4)),
                            tags=params.get("tags", []), progress=progress, should_stop=should_stop,
                            push=push).run(items)
    progress(report)
    return "cancelled" if report.cancelled else "done"


def run(services: Services, job: Job) -> str:
    """Run a claimed job to its end; returns the final state."""
    try:
        state = (run_finetune if job.kind == "finetune" else run_ingest)(services, job)
        error = None
    except Exception as err:  # noqa: BLE001 - recorded on the job; the worker carries on
        log.exception("job %s failed", job.id)
        state, error = "failed", f"{type(err).__name__}: {err}"
    with services.sessions() as session:
        session.execute(update(Job).where(Job.id == job.id).values(state=state, error=error, finished_at=now()))
        session.commit()
    return state


def work(services: Services, *, once: bool = False, poll: float = 2.0, worker: str | None = None) -> int:
    """Claim and run jobs until stopped (or, with ``once``, until none is left). Returns jobs run."""
    name = worker or f"{socket.gethostname()}:{os.getpid()}"
    ran = 0
    while True:
        with services.sessions() as session:
            job = claim(session, name)
        if job is None:
            if once:
                return ran
            time.sleep(poll)
            continue
        log.info("worker %s runs job %s", name, job.id)
        run(services, job)
        ran += 1


def describe(job: Job) -> dict[str, Any]:
    """State, counts, rate and ETA, as GET /v1/jobs/{id} answers."""
    end = aware(job.finished_at) if job.finished_at else now()
    elapsed = (end - aware(job.started_at)).total_seconds() if job.started_at else 0.0
    processed = job.done + job.failed
    rate = processed / elapsed if elapsed > 0 else 0.0
    remaining = (job.total - processed) if job.total is not None else None
    eta = remaining / rate if rate > 0 and remaining is not None and job.state == "running" else None
    return {"id": job.id, "kind": job.kind, "state": job.state, "params": job.params, "total": job.total,
            "done": job.done, "failed": job.failed, "images_per_s": round(rate, 3),
            "eta_s": round(eta, 1) if eta is not None else None, "errors": job.errors, "error": job.error,
            "worker": job.worker, "created_at": job.created_at, "started_at": job.started_at,
            "finished_at": job.finished_at}

"""Fine-tuning started from Label Studio ("Start training": START_TRAINING at /ml/webhook), run in
this server's own background pool so that it needs no ``xdlabel worker`` (one that is running may
take the job first: the job's lease decides). When the fine-tune is decided better and registered,
the ML backend switches to it: /setup then answers the new model version, which Label Studio
shows and stamps on the predictions it asks for next. GET /ml/training says how the last one went."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from fastapi import APIRouter, HTTPException

from xdlabel.api.ml_setup import Connections, ConnectionsDep
from xdlabel.finetune import FinetuneReport, describe
from xdlabel.jobs import claim, run
from xdlabel.services import Services

log = logging.getLogger(__name__)
router = APIRouter()
WORKER = f"{socket.gethostname()}:{os.getpid()}:ml-server"


def load_predictor(services: Services, checkpoint: str) -> Any:
    from xdecoder import Predictor, build_model, load_checkpoint

    s = services.settings
    model = build_model(s.model)
    load_checkpoint(model, checkpoint)
    return Predictor(model, device=s.device, settings=s.predictor_settings())


def train_here(services: Services, connections: Connections, job_id: int, project: int | None) -> str:
    """Claims the job (unless a worker has) and runs it; serves the result when registered.
    Returns the job's end state, or 'taken' when a worker holds it."""
    try:
        client = connections.client(services, project)
    except HTTPException:
        client = None  # run_finetune then says what to set
    with services.sessions() as session:
        job = claim(session, WORKER, services.settings.job_lease_seconds, only=job_id)
    if job is None:
        log.info("fine-tuning job %s: taken by a worker", job_id)
        return "taken"
    connections.training = {"job": job_id, "state": "running"}
    reports: list[FinetuneReport] = []
    state = run(services, job, client=client, on_report=reports.append)
    with services.sessions() as session:
        from index.models import Job

        row = session.get(Job, job_id)
        error = row.error if row is not None else None
    connections.training = {"job": job_id, "state": state, "error": error,
                            "report": describe(reports[0]) if reports else None}
    version = reports[0].model_version if reports else None
    if state == "done" and version:
        checkpoint = str(reports[0].checkpoint)
        connections.serve(load_predictor(services, checkpoint), version, checkpoint)
    return state


@router.get("/training")
def training(connections: ConnectionsDep) -> dict[str, Any]:
    """The last fine-tune this server ran: job, state, held-out report (interval, decision)."""
    return connections.training or {"state": "none"}

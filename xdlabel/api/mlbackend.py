"""Label Studio's ML backend protocol at /ml: register ``http://<host>:<port>/ml`` in a project.

Label Studio calls /health and /setup before every batch (1 s and 3 s timeouts), so both answer
without touching the model; /predict (ml_predict, ml_interactive) answers within a time budget;
/webhook (ml_webhook) stores human annotations and queues training, answering at once (Label
Studio waits 1 s and never retries). Every route needs HTTP basic auth
(``XDLABEL_ML_BACKEND_USER`` / ``_PASSWORD``); refusals say why in the body and in the log.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field
from sqlalchemy import select

from index.models import ModelVersion
from xdlabel.api import ml_predict, ml_training, ml_webhook
from xdlabel.api.auth import ServicesDep
from xdlabel.api.ml_setup import (
    Connections,
    ConnectionsDep,
    basic_header,
    labeling_config,
    parse_extra_params,
    project_id,
    refuse,
    webhook_url,
    what_to_set,
)
from xdlabel.api.schemas import Text
from xdlabel.services import Services

__all__ = ["Connections", "router"]
log = logging.getLogger(__name__)
basic = HTTPBasic(auto_error=False)


async def check_basic_auth(request: Request, services: ServicesDep,  # async: /health needs no worker thread
                           credentials: Annotated[HTTPBasicCredentials | None, Depends(basic)]) -> None:
    password = services.settings.ml_backend_password
    if not password:
        raise refuse(503, "the ML backend is off: set XDLABEL_ML_BACKEND_PASSWORD to enable it")
    if credentials is None:
        reason = "basic auth required"
        if request.url.path.endswith("/webhook"):  # Label Studio creates the backend's webhook without it
            reason += "; Label Studio's webhook carries no auth header: " + what_to_set(0, str(request.url)) \
                .replace("project 0", "the project")
        raise HTTPException(401, refuse(401, reason).detail, headers={"WWW-Authenticate": "Basic"})
    user_ok = secrets.compare_digest(credentials.username.encode(), services.settings.ml_backend_user.encode())
    password_ok = secrets.compare_digest(credentials.password.encode(), password.encode())
    if not (user_ok and password_ok):
        raise HTTPException(401, refuse(401, "wrong user or password").detail, headers={"WWW-Authenticate": "Basic"})


router = APIRouter(prefix="/ml", tags=["label studio ml backend"], dependencies=[Depends(check_basic_auth)])


class SetupRequest(BaseModel):
    project: Text = ""
    schema_: Text = Field("", alias="schema")
    hostname: Text | None = None
    access_token: Text | None = None
    extra_params: Any = None


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
def setup(body: SetupRequest, request: Request, services: ServicesDep, connections: ConnectionsDep) -> dict[str, str]:
    """Registration, and before every batch: checks the config and extra_params (a project we cannot
    serve is refused, with the reason), remembers the connection, and checks the project's webhook
    in the background (Label Studio creates it without auth)."""
    try:
        params = parse_extra_params(body.extra_params)
    except ValueError as err:
        raise refuse(400, str(err)) from None
    labeling_config(services, body.schema_, params)
    connections.remember(body.project, body.hostname, body.access_token, params)
    _warm_up(services)
    project = project_id(body.project)
    hook = webhook_url(request)
    s = services.settings
    if project is not None and s.ml_backend_password:
        try:
            client = connections.client(services, body.project)
        except HTTPException:
            log.warning("project %s: no Label Studio token to check its webhook with; %s", project,
                        what_to_set(project, hook))
        else:
            connections.heal_webhook(client, project, hook, basic_header(s.ml_backend_user, s.ml_backend_password))
    return {"model_version": connections.version(services)}


@router.get("/versions")
def versions(services: ServicesDep, connections: ConnectionsDep) -> dict[str, list[str]]:
    with services.sessions() as session:
        names = list(session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)))
    current = connections.version(services)
    return {"versions": names if current in names else [*names, current]}


router.include_router(ml_predict.router)
router.include_router(ml_webhook.router)
router.include_router(ml_training.router)

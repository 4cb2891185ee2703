"""``create_app``: the FastAPI application factory. Nothing is created at import time; the model
and the indexes load once per process (in the background from startup, so /health answers at once)."""

from __future__ import annotations

import errno
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xdlabel.api import mlbackend, overlay_route
from xdlabel.api.auth import header, key_scopes
from xdlabel.api.limits import MULTIPART_OVERHEAD, BodyLimit
from xdlabel.api.routes import ERRORS, router
from xdlabel.api.schemas import ReadyOut
from xdlabel.api.spread import SpreadConnections, board
from xdlabel.services import Services
from xdlabel.settings import Settings, load_settings

log = logging.getLogger(__name__)
CONFIG_FILE_VARIABLE = "XDLABEL_SERVE_CONFIG_FILE"  # `xdlabel serve --config-file`, for its worker processes
STATIC = Path(__file__).parent / "static"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def database_error(err: DBAPIError) -> tuple[int, str]:
    """What a database failure means for the client: full disk, busy, refused value or down."""
    message = str(err.orig).lower()
    if "disk is full" in message or "no space left" in message or "could not extend file" in message:
        return 507, "the database is out of disk space; an operator must free space, then retry"
    if "locked" in message or "lock timeout" in message or "could not obtain lock" in message \
            or "deadlock" in message or "statement timeout" in message:
        return 503, "the database is busy; try again shortly"
    if isinstance(err, IntegrityError):
        return 409, "the request conflicts with stored data"
    if isinstance(err, DataError):
        return 422, "the database refused a value in the request"
    if isinstance(err, OperationalError) or err.connection_invalidated:
        return 503, "the database is not reachable; try again shortly"
    return 500, "internal database error; see the server log"


def warm_up(services: Services) -> None:
    """Load the model and its image index, then take everything loaded so far out of the garbage
    collector's full passes (gc.freeze): each pass walked all those long-lived objects, a pause
    that every request in flight waited out. A model that does not load is left to the first
    request and /ready to report."""
    try:
        model = services.model
        services.store.index(model.version_id, "image", model.image_dim)
    except Exception:  # noqa: BLE001 - the server still starts; /ready says what is wrong
        log.exception("warm-up: the model or its index did not load")
        return
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


def app_from_environment() -> FastAPI:
    """The app of one ``xdlabel serve --workers N`` process: settings from XDLABEL_* variables over
    the config file the command was given, and its keep-alive connections spread over the workers."""
    app = create_app(load_settings(os.environ.get(CONFIG_FILE_VARIABLE)))
    board()  # this worker's row on the supervisor's board, claimed before its first connection
    app.add_middleware(SpreadConnections)
    return app


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """An app that makes its own services (a server) runs ``warm_up`` in the background from startup;
    one given services (tests, benches) leaves that to its caller."""
    owned = services is None
    services = services or Services(settings or Settings(), serving=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = services.settings.api_threads
        warming = threading.Thread(target=warm_up, args=(services,), daemon=True, name="xdlabel-warm-up")
        if owned:
            warming.start()
        yield
        if owned:
            warming.join(60)  # a shutdown during warm-up: let the load finish before the services close
            services.close()

    app = FastAPI(title="xdlabel", version="1", lifespan=lifespan, responses=ERRORS,
                  description="Text, image and region search over image corpora with X-Decoder.")
    app.state.services = services
    settings = services.settings
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    if settings.allowed_origins:  # off unless configured: browsers on other origins get no CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["X-API-Key", "Content-Type"])
    app.state.ls_connections = mlbackend.Connections()  # Label Studio servers met through /ml/setup
    app.include_router(router)
    app.include_router(overlay_route.router)
    app.include_router(mlbackend.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.exception_handler(DBAPIError)
    async def database_failed(_: Request, exc: DBAPIError) -> JSONResponse:
        status, message = database_error(exc)
        log.error("database error (%d): %s", status, exc.orig)
        return _error(status, message)

    @app.exception_handler(OSError)
    async def os_failed(_: Request, exc: OSError) -> JSONResponse:
        if exc.errno == errno.ENOSPC:
            log.error("disk full: %s", exc)
            return _error(507, "the server is out of disk space; an operator must free space, then retry")
        log.exception("unhandled OS error")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers (on the event loop: no thread needed). No API key needed."""
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], response_model=ReadyOut, response_model_exclude_none=True)
    def ready(key: Annotated[str | None, Depends(header)] = None) -> ReadyOut:
        """Readiness: the database answers and the model loads. The model name and database dialect
        only with a valid API key; never where the database is."""
        try:
            with services.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as err:
            status, message = database_error(err)
            raise HTTPException(503, "not ready: " + message) from None
        try:
            model = services.model.name
        except DBAPIError:
            raise
        except Exception:  # noqa: BLE001 - a model that does not load: not ready, the log says why
            log.exception("model did not load")
            raise HTTPException(503, "not ready: the model did not load; see the server log") from None
        if key and key_scopes(services, key) is not None:
            return ReadyOut(status="ready", model=model, database=services.engine.dialect.name)
        return ReadyOut(status="ready")

    @app.get("/", include_in_schema=False)
    def search_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    from xdlabel.api import video_routes

    app.include_router(video_routes.router)
    return app

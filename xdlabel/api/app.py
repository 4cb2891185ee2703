"""``create_app``: the FastAPI application factory. Nothing is created at import time; the model
and the indexes load once per process (the model on first use, so /health answers at once)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xdlabel.api import mlbackend
from xdlabel.api.routes import router
from xdlabel.services import Services
from xdlabel.settings import Settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    owned = services is None
    services = services or Services(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            services.close()

    app = FastAPI(title="xdlabel", version="1", lifespan=lifespan,
                  description="Text, image and region search over image corpora with X-Decoder.")
    app.state.services = services
    app.state.ls_connections = mlbackend.Connections()  # Label Studio servers met through /ml/setup
    app.include_router(router)
    app.include_router(mlbackend.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.exception_handler(OperationalError)
    async def database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return _error(503, "the database is not reachable; try again shortly")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers. No API key needed."""
        return {"status": "ok"}

    @app.get("/ready", tags=["health"])
    def ready() -> dict[str, object]:
        """Readiness: the database answers and the model is loaded."""
        try:
            with services.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as err:
            raise HTTPException(503, f"database not reachable: {err.orig}") from None
        return {"status": "ready", "model": services.model.name}

    @app.get("/", include_in_schema=False)
    def search_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app

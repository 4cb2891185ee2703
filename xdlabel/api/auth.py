"""API keys: random tokens shown once, stored as sha256, checked on every /v1 request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from index.models import ApiKey, utcnow
from xdlabel.services import Services

SCOPES = ("read", "write")
header = APIKeyHeader(name="X-API-Key", auto_error=False)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, name: str, scopes: Sequence[str] = SCOPES) -> str:
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {SCOPES}")
    key = "xdl_" + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, key_hash=hash_key(key), scopes=list(scopes)))
    session.commit()
    return key


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(session: Session, key_id: int) -> ApiKey | None:
    """Revokes the key (kept, with the time it was revoked); None when there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


_LIVE_KEY_SCOPES = select(ApiKey.scopes).where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))


def key_scopes(services: Services, key: str) -> list[str] | None:
    """The scopes of the live (not revoked) key with this value, or None. One indexed Core select on
    every request (no ORM session): a revoke in any process counts from the next request."""
    with services.engine.connect() as conn:
        return conn.scalar(_LIVE_KEY_SCOPES, {"key_hash": hash_key(key)})


async def services_of(request: Request) -> Services:  # async: no worker thread needed to read app state
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(services_of)]


def require(scope: str):  # type: ignore[no-untyped-def]
    def check(services: ServicesDep, key: Annotated[str | None, Depends(header)]) -> None:
        if not services.settings.require_api_key:
            return
        if not key:
            raise HTTPException(401, "missing API key: send it in the X-API-Key header")
        scopes = key_scopes(services, key)
        if scopes is None:
            raise HTTPException(401, "invalid or revoked API key")
        if scope not in scopes:
            raise HTTPException(403, f"this API key lacks the {scope!r} scope")

    return Depends(check)

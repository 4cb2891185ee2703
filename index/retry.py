"""Bounded retries with exponential backoff (tenacity) for errors that go away by themselves.

A transient error is one where the same call may succeed a moment later: SQLite's "database is
locked", a PostgreSQL serialization failure or deadlock, a dropped connection. Everything else
is raised at once: retrying a constraint violation or a bad request only hides it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

# PostgreSQL SQLSTATEs worth another try: serialization failure, deadlock, lock not available.
_PG_TRANSIENT = {"40001", "40P01", "55P03"}


def is_transient_db_error(err: BaseException) -> bool:
    if not isinstance(err, DBAPIError):
        return False
    code = getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)
    if code in _PG_TRANSIENT:
        return True
    message = str(err.orig).lower()
    if "database is locked" in message or "database table is locked" in message:
        return True
    # A connection that dropped; the pool hands out a fresh one on the next try.
    return isinstance(err, OperationalError) and bool(err.connection_invalidated)


def retry(fn: Callable[[], T], *, transient: Callable[[BaseException], bool] = is_transient_db_error,
          attempts: int = 5, first_wait: float = 0.05, max_wait: float = 2.0, what: str = "") -> T:
    """Calls ``fn`` until it returns, retrying ``transient`` errors ``attempts`` times in all with
    exponential backoff under full jitter (so racing processes spread out); the last error is raised
    as it was."""

    def note(state) -> None:  # type: ignore[no-untyped-def]
        log.warning("%s: transient error (%s), try %d of %d", what or getattr(fn, "__name__", "call"),
                    state.outcome.exception(), state.attempt_number, attempts)

    retrying = Retrying(retry=retry_if_exception(transient), stop=stop_after_attempt(attempts),
                        wait=wait_random_exponential(multiplier=first_wait, max=max_wait), reraise=True,
                        before_sleep=note)
    return retrying(fn)

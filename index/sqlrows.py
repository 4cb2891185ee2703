"""The retrieval store's reads of SQL: embedding rows of one (model version, kind) streamed in
chunks, their count, and the change log."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from index.models import Embedding, EmbeddingChange
from index.records import arrays

Key = tuple[int, str]  # (model version id, kind)


def where(key: Key) -> tuple[Any, Any]:
    return Embedding.model_version_id == key[0], Embedding.kind == key[1]


def vectors(session: Session, key: Key, ids: Iterable[int] | None, chunk: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, image ids, vectors) of the given ids, or of all rows of ``key``, ``chunk`` rows at a time."""
    columns = select(Embedding.id, Embedding.image_id, Embedding.vector).where(*where(key))
    if ids is not None:
        wanted = list(ids)
        for i in range(0, len(wanted), chunk):
            rows = session.execute(columns.where(Embedding.id.in_(wanted[i:i + chunk]))).all()
            if rows:
                yield arrays(rows)
        return
    after = -1
    while True:  # keyset pagination on (model_version_id, kind, id): one chunk in memory at a time
        rows = session.execute(columns.where(Embedding.id > after).order_by(Embedding.id).limit(chunk)).all()
        if not rows:
            return
        after = int(rows[-1][0])
        yield arrays(rows)


def count(session: Session, key: Key) -> int:
    return int(session.scalar(select(func.count(Embedding.id)).where(*where(key))) or 0)


def log_end(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(EmbeddingChange.seq), 0))) or 0)


def _past(key: Key, position: int) -> tuple[Any, Any, Any]:
    """``key``'s log rows past ``position`` (the index on model version, kind, seq)."""
    return (EmbeddingChange.model_version_id == key[0], EmbeddingChange.kind == key[1],
            EmbeddingChange.seq > position)


def log_tail(session: Session, key: Key, position: int) -> list[Any]:
    """(seq, embedding id, op) of ``key``'s log rows past ``position``, in order."""
    return list(session.execute(select(EmbeddingChange.seq, EmbeddingChange.embedding_id, EmbeddingChange.op)
                                .where(*_past(key, position)).order_by(EmbeddingChange.seq)).all())


def deleted_since(session: Session, key: Key, position: int) -> np.ndarray:
    """Ids the log deletes past ``position`` (one indexed read)."""
    return np.array(session.scalars(select(EmbeddingChange.embedding_id).where(
        *_past(key, position), EmbeddingChange.op == "delete")).all(), dtype=np.int64)

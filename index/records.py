"""Plain records of the retrieval store and the byte and array forms of its vectors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.indexfile import Manifest
from index.owners import Owners
from index.vectors import VectorIndex

log = logging.getLogger(__name__)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


@dataclass(frozen=True)
class Hit:
    embedding_id: int
    image_id: int
    score: float
    box: list[float] | None = None
    mask_rle: dict[str, Any] | None = None
    label: str | None = None


@dataclass(frozen=True)
class SyncReport:
    action: str  # loaded | updated | rebuilt
    count: int
    added: int = 0
    removed: int = 0


@dataclass(frozen=True)
class NewEmbedding:
    image_id: int
    kind: str
    vector: np.ndarray
    box: list[float] | None = None
    mask_rle: dict[str, Any] | None = None
    score: float | None = None
    label: str | None = None


def save_with_owners(index: VectorIndex, owners: Owners, path: Path, position: int) -> Manifest:
    """Save the index with its id -> image map (so a restart reads no SQL rows for it); a map that
    does not match the index exactly is left out, and the next open reads it from SQL."""
    pair = owners.pair
    if len(pair[0]) == index.ntotal:
        return index.save(path, position, pair)
    log.warning("index %s: id map of %d for %d vectors; saved without it", path, len(pair[0]), index.ntotal)
    return index.save(path, position)


def arrays(rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
            np.stack([from_bytes(r[2]) for r in rows]))

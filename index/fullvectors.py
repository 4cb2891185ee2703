"""Full-precision vectors on disk, memory-mapped, for re-ranking a compressed index's candidates.

A compressed (IVF-PQ) index keeps ~1/32 of each vector in RAM; its top candidates are scored again
exactly from these files, so recall is the coarse search's candidate recall, not PQ's.

Files are segments: raw little-endian float32 rows, written once and never changed. New vectors are
appended to a growing file under a temporary name of this process (a dead process's is removed as any
stale temporary); ``persist`` closes it under a final unique name, and the index file that names it
(with the ids of its rows) is what makes it part of the index. Two processes saving the same index
therefore never write the same file; the segments the latest index file names are the index's.
Rows of removed ids stay in their segment (the compressed index no longer returns them) until a
rebuild writes new segments.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import suppress
from pathlib import Path

import faiss
import numpy as np

__all__ = ["FullVectors", "remove_unreferenced"]


class FullVectors:
    def __init__(self, index_path: Path, dim: int, segments: list[tuple[str, np.ndarray]] | None = None) -> None:
        """``segments``: (file name beside ``index_path``, ids of its rows) as an index file recorded
        them; raises FileNotFoundError or ValueError when one is missing or of the wrong size."""
        self.path, self.dim = Path(index_path), dim
        self._row_bytes = 4 * dim
        self._segments: list[tuple[str, np.ndarray, np.ndarray]] = []  # name, ids, rows (memmap)
        for name, ids in segments or []:
            self._segments.append((name, ids, self._open(self.path.parent / name, len(ids))))
        self._growing: Path | None = None
        self._growing_ids: list[np.ndarray] = []
        self._growing_rows = 0
        self._growing_view: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ids, rows, memmap
        self._ids, self._where = _lookup([ids for _, ids, _ in self._segments])

    def _open(self, file: Path, rows: int) -> np.ndarray:
        size = file.stat().st_size
        if size != rows * self._row_bytes:
            raise ValueError(f"{file}: {size} bytes for {rows} vectors of dimension {self.dim}")
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(file, dtype="<f4", mode="r", shape=(rows, self.dim))

    @property
    def segments(self) -> list[tuple[str, np.ndarray]]:
        return [(name, ids) for name, ids, _ in self._segments]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        x = np.ascontiguousarray(vectors, dtype="<f4")
        if self._growing is None:
            prefix = f".{self.path.name}.{socket.gethostname()}.{os.getpid()}."
            self._growing = self.path.parent / f"{prefix}{uuid.uuid4().hex}.vec.tmp"
            self._growing.parent.mkdir(parents=True, exist_ok=True)
        with open(self._growing, "ab") as f:
            f.write(x.tobytes())
        self._growing_ids.append(np.asarray(ids, np.int64).copy())
        self._growing_rows += len(x)
        self._growing_view = None

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors [n, dim] of ``ids``; rows of ids it does not hold are NaN."""
        ids = np.asarray(ids, np.int64).ravel()
        out = np.full((len(ids), self.dim), np.nan, np.float32)
        parts = self._parts()
        for at, part, rows in self._locate(ids):
            out[at] = parts[part][rows]
        return out

    def inner_products(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[nq, m] inner products of each query with the vectors of its row of ``ids`` [nq, m];
        -inf where an id is negative or not held. FAISS reads the rows in place from the mapped
        files (no gathered copy: re-ranking reads thousands of rows per query)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        ids = np.asarray(ids, np.int64)
        out = np.full(ids.shape, -np.inf, np.float32)
        parts = self._parts()
        for at, part, rows in self._locate(ids.ravel()):
            local = np.full(ids.size, -1, np.int64)
            local[at] = rows
            scores = np.empty(ids.shape, np.float32)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(q), faiss.swig_ptr(parts[part]),
                                             faiss.swig_ptr(local), self.dim, ids.shape[0], ids.shape[1])
            out.flat[at] = scores.flat[at]
        return out

    def _parts(self) -> list[np.ndarray]:
        """The row arrays, segments first, then the growing file (when it holds rows)."""
        return [rows for _, _, rows in self._segments] + ([self._growing_lookup()[2]] if self._growing_rows else [])

    def _locate(self, ids: np.ndarray) -> list[tuple[np.ndarray, int, np.ndarray]]:
        """(positions in ``ids``, part, rows in that part) for each part holding some of ``ids``; an id
        in the growing file is found there (it is the newest), else in the last segment holding it."""
        found: list[tuple[np.ndarray, int, np.ndarray]] = []
        taken = np.zeros(len(ids), bool)
        if self._growing_rows:
            at, rows = _find(*self._growing_lookup()[:2], ids)
            found.append((at, len(self._segments), rows))
            taken[at] = True
        at, where = _find(self._ids, self._where, ids)
        at, where = at[~taken[at]], where[~taken[at]]
        part = where >> 40
        for p in np.unique(part):
            chosen = part == p
            found.append((at[chosen], int(p), where[chosen] & ((1 << 40) - 1)))
        return found

    def _growing_lookup(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._growing_view is None:
            assert self._growing is not None
            ids, rows = _lookup([np.concatenate(self._growing_ids)])
            self._growing_view = (ids, rows, np.memmap(self._growing, dtype="<f4", mode="r",
                                                       shape=(self._growing_rows, self.dim)))
        return self._growing_view

    def persist(self) -> list[tuple[str, np.ndarray]]:
        """Close the growing file as a segment (fsynced, under a final name) and return every segment."""
        if self._growing is not None and self._growing_rows:
            with open(self._growing, "rb+") as f:
                os.fsync(f.fileno())
            name = f"{self.path.name}.{uuid.uuid4().hex}.vec"
            os.replace(self._growing, self.path.parent / name)
            ids = np.concatenate(self._growing_ids)
            self._segments.append((name, ids, self._open(self.path.parent / name, len(ids))))
            self._growing, self._growing_ids, self._growing_rows, self._growing_view = None, [], 0, None
            self._ids, self._where = _lookup([ids for _, ids, _ in self._segments])
        return self.segments


def _lookup(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and where each is, ``part << 40 | row``, over ``parts`` (id arrays); a later row wins
    for a repeated id. Rebuilt when a segment is added, not on every add."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.concatenate(parts)
    where = np.concatenate([(i << 40) | np.arange(len(p), dtype=np.int64) for i, p in enumerate(parts)])
    order = np.lexsort((np.arange(len(ids)), ids))  # by id, then by position: the last of a run wins
    ids, where = ids[order], where[order]
    last = np.ones(len(ids), bool)
    last[:-1] = ids[1:] != ids[:-1]
    return ids[last], where[last]


def _find(sorted_ids: np.ndarray, where: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``ids`` found in ``sorted_ids``, their ``where``)."""
    if not len(sorted_ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    at = np.flatnonzero(sorted_ids[pos] == ids)
    return at, where[pos[at]]


def remove_unreferenced(index_path: Path, keep: set[str], min_age_s: float = 3600.0) -> int:
    """Delete segment files of ``index_path`` that its latest file does not name and that are older
    than ``min_age_s`` (a recent one may belong to an index another process is about to save)."""
    removed = 0
    for file in index_path.parent.glob(f"{index_path.name}.*.vec"):
        if file.name not in keep and time.time() - file.stat().st_mtime > min_age_s:
            with suppress(FileNotFoundError):
                file.unlink()
                removed += 1
    return removed

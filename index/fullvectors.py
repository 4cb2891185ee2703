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
        self._growing_row_of: dict[int, int] = {}
        self._growing_map: np.ndarray | None = None
        self._reindex()

    def _open(self, file: Path, rows: int) -> np.ndarray:
        size = file.stat().st_size
        if size != rows * self._row_bytes:
            raise ValueError(f"{file}: {size} bytes for {rows} vectors of dimension {self.dim}")
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(file, dtype="<f4", mode="r", shape=(rows, self.dim))

    def _reindex(self) -> None:
        """id -> (segment, row), sorted by id, over the segments (the growing file has a dict); a later
        segment wins for a repeated id. Rebuilt when a segment is added, not on every add."""
        parts = [ids for _, ids, _ in self._segments]
        if not parts:
            self._ids, self._where = np.zeros(0, np.int64), np.zeros(0, np.int64)
            return
        ids = np.concatenate(parts)
        where = np.concatenate([(i << 40) | np.arange(len(p), dtype=np.int64) for i, p in enumerate(parts)])
        order = np.lexsort((np.arange(len(ids)), ids))  # by id, then by position: the last of a run wins
        ids, where = ids[order], where[order]
        last = np.ones(len(ids), bool)
        last[:-1] = ids[1:] != ids[:-1]
        self._ids, self._where = ids[last], where[last]

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
        ids = np.asarray(ids, np.int64).copy()
        self._growing_ids.append(ids)
        self._growing_row_of.update(zip(ids.tolist(), range(self._growing_rows, self._growing_rows + len(ids)),
                                        strict=True))
        self._growing_rows += len(x)
        self._growing_map = None

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors [n, dim] of ``ids``; rows of ids it does not hold are NaN."""
        ids = np.asarray(ids, np.int64).ravel()
        out = np.empty((len(ids), self.dim), np.float32)  # not pre-filled: re-ranking reads thousands of rows
        filled = np.zeros(len(ids), bool)
        if len(self._ids):
            pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
            found = np.flatnonzero(self._ids[pos] == ids)
            where = self._where[pos[found]]
            parts, rows = where >> 40, where & ((1 << 40) - 1)
            for part in np.unique(parts):
                chosen = parts == part
                order = np.argsort(rows[chosen])  # ascending offsets: sequential reads of the file
                out[found[chosen][order]] = self._segments[int(part)][2][rows[chosen][order]]
            filled[found] = True
        if self._growing_row_of:
            newer = [(i, self._growing_row_of[v]) for i, v in enumerate(ids.tolist()) if v in self._growing_row_of]
            if newer:
                at, rows_ = (np.array(x, np.int64) for x in zip(*newer, strict=True))
                out[at] = self._growing_array()[rows_]
                filled[at] = True
        out[~filled] = np.nan
        return out

    def _growing_array(self) -> np.ndarray:
        if self._growing_map is None:
            assert self._growing is not None
            self._growing_map = np.memmap(self._growing, dtype="<f4", mode="r", shape=(self._growing_rows, self.dim))
        return self._growing_map

    def persist(self) -> list[tuple[str, np.ndarray]]:
        """Close the growing file as a segment (fsynced, under a final name) and return every segment."""
        if self._growing is not None and self._growing_rows:
            with open(self._growing, "rb+") as f:
                os.fsync(f.fileno())
            name = f"{self.path.name}.{uuid.uuid4().hex}.vec"
            os.replace(self._growing, self.path.parent / name)
            ids = np.concatenate(self._growing_ids)
            self._segments.append((name, ids, self._open(self.path.parent / name, len(ids))))
            self._growing, self._growing_ids, self._growing_rows, self._growing_map = None, [], 0, None
            self._growing_row_of = {}
            self._reindex()
        return self.segments


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

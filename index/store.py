"""SQL + FAISS together: SQL holds every vector and is the truth; indexes follow it.

An index is loaded from disk only after its manifest agrees with SQL (count, sum and max of
ids); a stale index is brought up to date by adding and removing the ids that differ, and a
missing or corrupt one is rebuilt from the vectors in SQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from index.filters import Filters, filtered_ids
from index.models import Embedding, Image
from index.vectors import IndexParams, Manifest, VectorIndex

log = logging.getLogger(__name__)
KINDS = ("image", "region")


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


class Owners:
    """Embedding id -> image id of one index, in memory: image hits need no SQL round trip."""

    def __init__(self, ids: np.ndarray, image_ids: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.image_ids = np.asarray(image_ids, np.int64)[order]

    def add(self, ids: np.ndarray, image_ids: np.ndarray) -> None:
        merged = Owners(np.concatenate([self.ids, ids]), np.concatenate([self.image_ids, image_ids]))
        self.ids, self.image_ids = merged.ids, merged.image_ids

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, ids)
        self.ids, self.image_ids = self.ids[keep], self.image_ids[keep]

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Image id of each embedding id; -1 where unknown."""
        if not len(self.ids):
            return np.full(np.shape(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)  # no copies: O(k log n)
        return np.where(self.ids[pos] == ids, self.image_ids[pos], -1)


class RetrievalStore:
    def __init__(self, sessions: sessionmaker[Session], index_dir: Path, params: IndexParams | None = None,
                 refresh_seconds: float | None = 5.0) -> None:
        """``refresh_seconds``: how often a loaded index is compared with SQL, so vectors written
        by other processes (ingest workers) become searchable; None never checks again."""
        self.sessions = sessions
        self.index_dir = Path(index_dir)
        self.params = params or IndexParams()
        self.refresh_seconds = refresh_seconds
        self._indexes: dict[tuple[int, str], VectorIndex] = {}
        self._owners: dict[tuple[int, str], Owners] = {}
        self._checked: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()

    # -- indexes ------------------------------------------------------------------------------

    def _path(self, model_version_id: int, kind: str) -> Path:
        return self.index_dir / f"mv{model_version_id}-{kind}.faiss"

    def _sql_manifest(self, session: Session, model_version_id: int, kind: str) -> tuple[int, int, int]:
        count, total, top = session.execute(
            select(func.count(Embedding.id), func.coalesce(func.sum(Embedding.id), 0),
                   func.coalesce(func.max(Embedding.id), 0))
            .where(Embedding.model_version_id == model_version_id, Embedding.kind == kind)).one()
        return int(count), int(total), int(top)

    def _vectors(self, session: Session, ids: Iterable[int] | None, model_version_id: int,
                 kind: str) -> tuple[np.ndarray, np.ndarray]:
        query = select(Embedding.id, Embedding.vector).where(
            Embedding.model_version_id == model_version_id, Embedding.kind == kind)
        if ids is not None:
            query = query.where(Embedding.id.in_(list(ids)))
        rows = session.execute(query.order_by(Embedding.id)).all()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return (np.array([r[0] for r in rows], dtype=np.int64),
                np.stack([from_bytes(r[1]) for r in rows]))

    def index(self, model_version_id: int, kind: str, dim: int) -> VectorIndex:
        """The index of (model version, kind), verified against SQL on first use in this process."""
        key = (model_version_id, kind)
        with self._lock:
            if key not in self._indexes:
                self._indexes[key], report = self._open(model_version_id, kind, dim)
                self._owners[key] = self._load_owners(model_version_id, kind)
                self._checked[key] = time.monotonic()
                log.info("index mv%s-%s %s (%d vectors)", model_version_id, kind, report.action, report.count)
            elif self.refresh_seconds is not None and time.monotonic() - self._checked[key] >= self.refresh_seconds:
                self._refresh(key)
            return self._indexes[key]

    def _refresh(self, key: tuple[int, str]) -> None:
        """Catch a loaded index up with SQL (rows other processes wrote or deleted)."""
        self._checked[key] = time.monotonic()
        owners, index = self._owners[key], self._indexes[key]
        with self.sessions() as session:
            if self._sql_manifest(session, *key) == (len(owners.ids), int(owners.ids.sum()),
                                                     int(owners.ids.max(initial=0))):
                return
            rows = session.execute(select(Embedding.id, Embedding.image_id).where(
                Embedding.model_version_id == key[0], Embedding.kind == key[1])).all()
            sql = np.array(rows, dtype=np.int64).reshape(-1, 2)
            extra = np.setdiff1d(owners.ids, sql[:, 0])
            missing = np.setdiff1d(sql[:, 0], owners.ids)
            index.remove(extra)
            owners.remove(extra)
            ids, vectors = self._vectors(session, missing.tolist(), *key)
            index.add(ids, vectors)
            pairs = sql[np.isin(sql[:, 0], ids)]
            owners.add(pairs[:, 0], pairs[:, 1])
        log.info("index mv%s-%s caught up with SQL: +%d -%d", *key, len(ids), len(extra))

    def sync(self, model_version_id: int, kind: str, dim: int) -> SyncReport:
        with self._lock:
            self._indexes.pop((model_version_id, kind), None)
            index, report = self._open(model_version_id, kind, dim)
            self._indexes[(model_version_id, kind)] = index
            self._owners[(model_version_id, kind)] = self._load_owners(model_version_id, kind)
            self._checked[(model_version_id, kind)] = time.monotonic()
            return report

    def _load_owners(self, model_version_id: int, kind: str) -> Owners:
        with self.sessions() as session:
            rows = session.execute(select(Embedding.id, Embedding.image_id).where(
                Embedding.model_version_id == model_version_id, Embedding.kind == kind)).all()
        array = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return Owners(array[:, 0], array[:, 1])

    def _open(self, model_version_id: int, kind: str, dim: int) -> tuple[VectorIndex, SyncReport]:
        path = self._path(model_version_id, kind)
        with self.sessions() as session:
            count, total, top = self._sql_manifest(session, model_version_id, kind)
            try:
                index, manifest = VectorIndex.load(path, self.params)
                if index.dim != dim:
                    raise ValueError(f"dimension {index.dim} != {dim}")
            except (OSError, RuntimeError, ValueError, TypeError, KeyError) as err:
                if path.exists():
                    log.warning("index %s unusable (%s); rebuilding from SQL", path, err)
                return self._rebuild(session, model_version_id, kind, dim)
            log.debug("manifest %s vs SQL %s", manifest, (count, total, top))
            if (manifest.count, manifest.id_sum, manifest.id_max) == (count, total, top):
                return index, SyncReport("loaded", count)
            # Stale: apply the difference.
            sql_ids = np.array(session.scalars(select(Embedding.id).where(
                Embedding.model_version_id == model_version_id, Embedding.kind == kind)).all(), dtype=np.int64)
            have = index.ids()
            extra = np.setdiff1d(have, sql_ids)
            missing = np.setdiff1d(sql_ids, have)
            index.remove(extra)
            ids, vectors = self._vectors(session, missing.tolist(), model_version_id, kind)
            index.add(ids, vectors)
            index.save(path)
            return index, SyncReport("updated", index.ntotal, added=len(ids), removed=len(extra))

    def _rebuild(self, session: Session, model_version_id: int, kind: str, dim: int
                 ) -> tuple[VectorIndex, SyncReport]:
        ids, vectors = self._vectors(session, None, model_version_id, kind)
        index = VectorIndex.build(dim, ids, vectors if len(ids) else np.zeros((0, dim), np.float32), self.params)
        index.save(self._path(model_version_id, kind))
        return index, SyncReport("rebuilt", index.ntotal, added=len(ids))

    def rebuild(self, model_version_id: int, kind: str, dim: int) -> SyncReport:
        with self._lock, self.sessions() as session:
            index, report = self._rebuild(session, model_version_id, kind, dim)
            self._indexes[(model_version_id, kind)] = index
        self._owners[(model_version_id, kind)] = self._load_owners(model_version_id, kind)
        self._checked[(model_version_id, kind)] = time.monotonic()
        return report

    def save(self) -> dict[tuple[int, str], Manifest]:
        with self._lock:
            return {key: index.save(self._path(*key)) for key, index in self._indexes.items()}

    # -- writes -------------------------------------------------------------------------------

    def add_embeddings(self, session: Session, model_version_id: int, dims: Mapping[str, int],
                       items: Sequence[NewEmbedding]) -> list[int]:
        """Insert rows in ``session``'s transaction (with whatever else it holds) and commit, then
        add them to the indexes. ``dims`` gives the vector dimension of each kind.

        A crash between the commit and the index update leaves the index stale, which the next
        ``index()`` in any process repairs from SQL.
        """
        unknown = {item.kind for item in items} - set(KINDS)
        if unknown:
            raise ValueError(f"kind must be one of {KINDS}, got {sorted(unknown)}")
        # Open (or rebuild) the indexes before the commit, so the new rows are added exactly once.
        indexes = {kind: self.index(model_version_id, kind, dims[kind]) for kind in {item.kind for item in items}}
        rows = []
        for item in items:
            dim = dims[item.kind]
            vector = np.asarray(item.vector, dtype=np.float32)
            if vector.shape != (dim,):
                raise ValueError(f"expected a vector of dimension {dim}, got shape {vector.shape}")
            rows.append(Embedding(model_version_id=model_version_id, image_id=item.image_id, kind=item.kind,
                                  vector=to_bytes(vector), box=item.box, mask_rle=item.mask_rle,
                                  score=item.score, label=item.label))
        session.add_all(rows)
        session.commit()
        for kind in KINDS:
            chosen = [(row, item.vector) for row, item in zip(rows, items, strict=True) if item.kind == kind]
            if chosen:
                ids = np.array([row.id for row, _ in chosen], dtype=np.int64)
                indexes[kind].add(ids, np.stack([vector for _, vector in chosen]))
                self._owners[(model_version_id, kind)].add(
                    ids, np.array([row.image_id for row, _ in chosen], dtype=np.int64))
        return [row.id for row in rows]

    def remove_images(self, session: Session, image_ids: Sequence[int]) -> int:
        """Delete images (their embeddings cascade) and drop their vectors from loaded indexes."""
        doomed = session.execute(select(Embedding.id, Embedding.model_version_id, Embedding.kind)
                                 .where(Embedding.image_id.in_(list(image_ids)))).all()
        session.execute(delete(Embedding).where(Embedding.image_id.in_(list(image_ids))))
        session.execute(delete(Image).where(Image.id.in_(list(image_ids))))
        session.commit()
        with self._lock:
            for (mv, kind), index in self._indexes.items():
                ids = np.array([d[0] for d in doomed if d[1] == mv and d[2] == kind], dtype=np.int64)
                index.remove(ids)
                self._owners[(mv, kind)].remove(ids)
        return len(doomed)

    # -- search -------------------------------------------------------------------------------

    def search(self, model_version_id: int, kind: str, queries: np.ndarray, k: int = 10, *,
               filters: Filters | None = None, offset: int = 0, min_score: float | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top hits per query row, best first; ``offset`` skips that many for paging."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        index = self.index(model_version_id, kind, queries.shape[1])
        filters = filters or Filters()
        allowed = None
        if not filters.empty:
            with self.sessions() as session:
                allowed = np.array(session.scalars(filtered_ids(model_version_id, kind, filters)).all(),
                                   dtype=np.int64)
        scores, ids = index.search(queries, k + offset, allowed=allowed, nprobe=nprobe)
        scores, ids = scores[:, offset:], ids[:, offset:]
        if kind == "image":  # image hits carry no geometry: no SQL needed
            owners = self._owners[(model_version_id, kind)].lookup(ids)
            return [[Hit(int(i), int(o), float(s)) for s, i, o in zip(srow, irow, orow, strict=True)
                     if i >= 0 and o >= 0 and (min_score is None or s >= min_score)]
                    for srow, irow, orow in zip(scores, ids, owners, strict=True)]
        with self.sessions() as session:
            wanted = {int(i) for i in ids.ravel() if i >= 0}
            rows = {e.id: e for e in session.scalars(select(Embedding).where(Embedding.id.in_(wanted)))}
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, i in zip(row_scores, row_ids, strict=True):
                if i < 0 or int(i) not in rows or (min_score is not None and score < min_score):
                    continue
                e = rows[int(i)]
                hits.append(Hit(e.id, e.image_id, float(score), e.box, e.mask_rle, e.label))
            results.append(hits)
        return results

"""SQL + FAISS together: SQL holds every vector and is the truth; indexes follow it.

Freshness comes from the change log: database triggers append every insert, update and delete of
an embedding, whatever wrote it, to ``embedding_changes`` with a ``seq`` that grows in commit order.
A saved index records the last ``seq`` it covers; opening it, or refreshing a loaded one, applies
only the log rows past that position (adds: their vectors from SQL; deletes: their ids). A missing,
corrupt or inconsistent index is rebuilt from SQL, streamed in chunks.

A server's store (``defer_open``, with ``refresh_seconds`` > 0: it shows other processes' writes a
little late anyway) answers its first search from the saved file as soon as it is mapped: the log's
deletes past the file are hidden at once (one indexed SQL read), and applying the tail, checking the
count against SQL and saving run in a background thread, as every later catch-up does.

An index that outgrows its kind (flat past ``exact_max``; IVF whose size moved by ``retrain_factor``
since training) is rebuilt in a background thread from SQL, brought up to date from the log and
swapped in; searches keep using the old index meanwhile and never wait for the build.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from index import sqlrows
from index.allowed import AllowedCache
from index.calibrate import Calibration
from index.filters import Filters
from index.indexfile import Manifest, remove_stale_temps
from index.models import Embedding, Image
from index.owners import Owners
from index.records import Hit, NewEmbedding, SyncReport, from_bytes, save_with_owners, to_bytes
from index.vectors import IndexParams, VectorIndex, train_size

log = logging.getLogger(__name__)
__all__ = ["Hit", "NewEmbedding", "Owners", "RetrievalStore", "SyncReport", "from_bytes", "to_bytes"]
KINDS = ("image", "region")
CHUNK = 5_000  # rows per SQL round trip when streaming vectors (also under SQLite's parameter limit)
_GENERATIONS = itertools.count(1)


@dataclass
class _Live:
    """A loaded index, its owners and the log position both cover. Replaced whole on a swap."""

    index: VectorIndex
    owners: Owners
    position: int
    dim: int
    checked: float
    # opened without the log's tail: ids it deletes, still indexed but left out of hits, and the count
    # against SQL not checked yet; the first catch-up applies the tail and checks
    hidden: np.ndarray | None = None
    verified: bool = True
    # new on every change to the index (unique in the process): cached filter results of older ones are stale
    generation: int = field(default_factory=lambda: next(_GENERATIONS))


class RetrievalStore:
    def __init__(self, sessions: sessionmaker[Session], index_dir: Path, params: IndexParams | None = None,
                 refresh_seconds: float | None = 5.0, defer_open: bool = False) -> None:
        """``refresh_seconds``: how often a loaded index reads the change log, so vectors written
        by other processes (ingest workers) become searchable; None never checks again.
        ``defer_open``: a first search does not wait for the log's tail (see above); for servers,
        not for a command that must see every committed row."""
        self.sessions = sessions
        self.index_dir = Path(index_dir)
        self.params = params or IndexParams()
        self.refresh_seconds = refresh_seconds
        self.defer_open = defer_open
        self.chunk = CHUNK
        self._live: dict[tuple[int, str], _Live] = {}
        self._locks: dict[tuple[int, str], threading.RLock] = {}
        self._builds: dict[tuple[int, str], threading.Thread] = {}
        self._lock = threading.Lock()  # guards the three dicts
        self.allowed = AllowedCache(sessions)
        self._catching: dict[tuple[int, str], threading.Thread] = {}

    # -- indexes ------------------------------------------------------------------------------

    def _path(self, model_version_id: int, kind: str) -> Path:
        return self.index_dir / f"mv{model_version_id}-{kind}.faiss"

    def _key_lock(self, key: tuple[int, str]) -> threading.RLock:
        with self._lock:
            return self._locks.setdefault(key, threading.RLock())

    def index(self, model_version_id: int, kind: str, dim: int) -> VectorIndex:
        """The index of (model version, kind), checked against the change log on first use in
        this process and every ``refresh_seconds`` after."""
        return self._get((model_version_id, kind), dim).index

    def _get(self, key: tuple[int, str], dim: int) -> _Live:
        live = self._live.get(key)
        if live is None:
            with self._key_lock(key):
                live = self._live.get(key)
                if live is None:
                    live, report = self._open(key, dim, defer=self.defer_open and bool(self.refresh_seconds))
                    self._live[key] = live
                    log.info("index mv%s-%s %s (%d vectors)", *key, report.action, report.count)
                    if not live.verified:
                        self._catch_up_in_background(key)
                    self._maybe_grow(key)
            return live
        if self.refresh_seconds is not None and time.monotonic() - live.checked >= self.refresh_seconds:
            if self.refresh_seconds > 0:  # off the query path: this search uses what is loaded
                self._catch_up_in_background(key)
            else:  # 0: every search sees every committed change (tests, benches)
                lock = self._key_lock(key)
                if lock.acquire(blocking=False):  # busy (catch-up, swap, save): search what is loaded
                    try:
                        self._catch_up(key)
                    finally:
                        lock.release()
        return self._live[key]

    def _catch_up_in_background(self, key: tuple[int, str]) -> None:
        def run() -> None:
            try:
                with self._key_lock(key):
                    self._catch_up(key)
            except Exception:  # the loaded index keeps serving; the next interval tries again
                log.exception("catching up index mv%s-%s with the change log failed", *key)
            finally:
                with self._lock:
                    self._catching.pop(key, None)

        with self._lock:
            if key in self._catching:
                return
            thread = threading.Thread(target=run, daemon=True, name=f"index-catch-up-mv{key[0]}-{key[1]}")
            self._catching[key] = thread
            self._live[key].checked = time.monotonic()  # one thread per interval, however many searches
            thread.start()  # under the lock: wait() never sees it unstarted

    def _catch_up(self, key: tuple[int, str]) -> None:
        """Apply the change log past the loaded index's position (rows other processes wrote or
        deleted). Caller holds the key's lock."""
        live = self._live[key]
        live.checked = time.monotonic()
        with self.sessions() as session:  # a first write copies mapped lists: here, not on the query path
            position, added, removed = self._apply_log(session, key, live.index, live.owners, live.position)
            count = None if live.verified else sqlrows.count(session, key)
        live.position = position
        live.hidden = None  # removed from the index now
        if added or removed:
            live.generation = next(_GENERATIONS)
            log.info("index mv%s-%s caught up with the change log: +%d -%d", *key, added, removed)
        if count is not None:
            live.verified = True
            if not self._agrees(live.index, live.owners, count):  # searches use it until the rebuild swaps
                log.warning("index %s disagrees with SQL (%d vectors, SQL %d); rebuilding in the background",
                            self._path(*key), live.index.ntotal, count)
                self._start_build(key, live.dim)
                return
            if added or removed:  # the next open starts from here
                save_with_owners(live.index, live.owners, self._path(*key), position)
        self._maybe_grow(key)

    def _apply_log(self, session: Session, key: tuple[int, str], index: VectorIndex, owners: Owners,
                   position: int) -> tuple[int, int, int]:
        """Bring ``index``/``owners`` from ``position`` to the end of the log; idempotent, so it
        may start from a position some of whose later changes the index already has.
        Returns (new position, added, removed)."""
        rows = sqlrows.log_tail(session, key, position)
        if not rows:
            return position, 0, 0
        last: dict[int, str] = {}
        deleted: set[int] = set()
        for _, embedding_id, op in rows:
            last[embedding_id] = op
            if op == "delete":
                deleted.add(embedding_id)
        gone = np.array(sorted(deleted), dtype=np.int64)
        gone = gone[owners.contains(gone)]  # ids added and deleted since: no write (a mapped index stays mapped)
        removed = index.remove(gone)
        owners.remove(gone)
        wanted = np.array(sorted(i for i, op in last.items() if op == "add"), dtype=np.int64)
        wanted = wanted[~owners.contains(wanted)]  # already added by this process
        added = 0
        for ids, image_ids, vectors in sqlrows.vectors(session, key, wanted.tolist(), self.chunk):
            owners.add(ids, image_ids)  # owners first: a concurrent search never finds an id it cannot place
            index.add(ids, vectors)
            added += len(ids)
        return int(rows[-1][0]), added, removed

    @staticmethod
    def _agrees(index: VectorIndex, owners: Owners, count: int) -> bool:
        """A file that disagrees with SQL after the log (a database restored from a backup, a log
        pruned past it) is not trusted."""
        return index.ntotal == count and not (owners.image_ids < 0).any()

    def _open(self, key: tuple[int, str], dim: int, defer: bool = False) -> tuple[_Live, SyncReport]:
        """Open the saved index (or rebuild it). ``defer``: return before the log's tail is applied
        and the count checked, with the tail's deletes hidden; ``_catch_up`` does the rest."""
        path = self._path(*key)
        remove_stale_temps(path)
        with self.sessions() as session:
            try:
                index, manifest, saved = VectorIndex.load_with_owners(path, self.params)
                if index.dim != dim:
                    raise ValueError(f"dimension {index.dim} != {dim}")
                if manifest.position > sqlrows.log_end(session):
                    raise ValueError(f"covers change {manifest.position}, past the end of this database's log")
            except (OSError, RuntimeError, ValueError, TypeError, KeyError) as err:
                if path.exists():
                    log.warning("index %s unusable (%s); rebuilding from SQL", path, err)
                return self._rebuild(session, key, dim)
            # the id map saved with the index (numpy arrays); SQL only for a file without one
            owners = Owners(*saved) if saved is not None else self._owners_of(session, key, index.ids())
            if defer:
                hidden = sqlrows.deleted_since(session, key, manifest.position)
                hidden = hidden[owners.contains(hidden)]
                return (_Live(index, owners, manifest.position, dim, time.monotonic(),
                              hidden if len(hidden) else None, verified=False),  # None: searches skip the filter
                        SyncReport("loaded", index.ntotal, removed=len(hidden)))
            position, added, removed = self._apply_log(session, key, index, owners, manifest.position)
            count = sqlrows.count(session, key)
            if not self._agrees(index, owners, count):
                log.warning("index %s disagrees with SQL (%d vectors, SQL %d); rebuilding", path, index.ntotal, count)
                return self._rebuild(session, key, dim)
        live = _Live(index, owners, position, dim, time.monotonic())
        if not (added or removed):
            return live, SyncReport("loaded", index.ntotal)
        save_with_owners(index, owners, path, position)
        return live, SyncReport("updated", index.ntotal, added=added, removed=removed)

    def _owners_of(self, session: Session, key: tuple[int, str], ids: np.ndarray) -> Owners:
        """Owners of exactly ``ids``; ids no longer in SQL get image -1 (the log removes them)."""
        rows = session.execute(select(Embedding.id, Embedding.image_id).where(*sqlrows.where(key))).all()
        sql = Owners(*np.array(rows, dtype=np.int64).reshape(-1, 2).T)
        return Owners(ids, sql.lookup(np.asarray(ids, np.int64)))

    def _build(self, session: Session, key: tuple[int, str], dim: int) -> tuple[VectorIndex, Owners, int]:
        """A new index from SQL, streamed, up to date with the log at the end (not locked: the
        caller swaps it in). IVF is trained on a random sample of the rows."""
        position = sqlrows.log_end(session)  # every change up to here is in what is read below
        all_ids = np.array(session.scalars(select(Embedding.id).where(*sqlrows.where(key))).all(), dtype=np.int64)
        sample = np.zeros((0, dim), np.float32)
        if len(all_ids) > self.params.exact_max:
            chosen = np.random.default_rng(0).choice(all_ids, train_size(len(all_ids), self.params, dim), replace=False)
            picked = sqlrows.vectors(session, key, np.sort(chosen).tolist(), self.chunk)
            sample = np.concatenate([v for _, _, v in picked])
        del all_ids
        index = VectorIndex.empty(dim, sqlrows.count(session, key), sample, self.params, self._path(*key))
        calibration = Calibration(sample) if index.kind != "flat" else None
        del sample
        parts = []
        for ids, image_ids, vectors in sqlrows.vectors(session, key, None, self.chunk):
            index.add(ids, vectors)
            if calibration is not None:  # exact top-10 of the calibration queries, on the same stream
                calibration.observe(ids, vectors)
            parts.append((ids, image_ids))
        if calibration is not None:
            index.calibrate(calibration)
        owners = Owners(np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
                        np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64))
        position, _, _ = self._apply_log(session, key, index, owners, position)
        return index, owners, position

    def _rebuild(self, session: Session, key: tuple[int, str], dim: int) -> tuple[_Live, SyncReport]:
        index, owners, position = self._build(session, key, dim)
        save_with_owners(index, owners, self._path(*key), position)
        return _Live(index, owners, position, dim, time.monotonic()), SyncReport("rebuilt", index.ntotal,
                                                                                  added=index.ntotal)

    # -- following the data's size --------------------------------------------------------------

    def _maybe_grow(self, key: tuple[int, str]) -> None:
        """Start a background rebuild when the loaded index has outgrown its kind."""
        live = self._live.get(key)
        if live is not None and live.index.outgrown():
            log.info("index mv%s-%s: %d vectors outgrew its %s index; rebuilding in the background",
                     *key, live.index.ntotal, live.index.kind)
            self._start_build(key, live.dim)

    def _start_build(self, key: tuple[int, str], dim: int) -> None:
        """Rebuild from SQL in a background thread and swap the result in; one at a time per key."""
        with self._lock:
            running = self._builds.get(key)
            if running is not None and running.is_alive():
                return
            thread = threading.Thread(target=self._grow, args=(key, dim), daemon=True,
                                      name=f"index-build-mv{key[0]}-{key[1]}")
            self._builds[key] = thread
        thread.start()

    def _grow(self, key: tuple[int, str], dim: int) -> None:
        try:
            with self.sessions() as session:
                index, owners, position = self._build(session, key, dim)
            try:
                save_with_owners(index, owners, self._path(*key), position)  # not shared yet: no lock
            except OSError as err:  # a full disk must not keep the better index from serving
                log.warning("could not save the rebuilt index mv%s-%s: %s", *key, err)
            with self._key_lock(key), self.sessions() as session:
                # changes committed during the save, then the swap: searches move to the new index
                position, _, _ = self._apply_log(session, key, index, owners, position)
                old = self._live.get(key)
                self._live[key] = _Live(index, owners, position, dim, time.monotonic())
            log.info("index mv%s-%s: swapped %s (%d) for %s (%d vectors)", *key, old.index.kind if old else "-",
                     old.index.ntotal if old else 0, index.kind, index.ntotal)
        except Exception:  # the old index keeps serving; the next growth check tries again
            log.exception("background rebuild of index mv%s-%s failed", *key)

    def building(self, model_version_id: int, kind: str) -> bool:
        thread = self._builds.get((model_version_id, kind))
        return thread is not None and thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for background rebuilds and catch-ups; True when none is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # a catch-up may start a rebuild: look again after each join
            with self._lock:
                running = [t for t in [*self._builds.values(), *self._catching.values()] if t.is_alive()]
            if not running:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            running[0].join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- explicit sync, rebuild, save -----------------------------------------------------------

    def sync(self, model_version_id: int, kind: str, dim: int) -> SyncReport:
        """Reopen the saved index and bring it up to date (what a fresh process would do)."""
        key = (model_version_id, kind)
        with self._key_lock(key):
            self._live.pop(key, None)
            live, report = self._open(key, dim)
            self._live[key] = live
        self._maybe_grow(key)
        return report

    def rebuild(self, model_version_id: int, kind: str, dim: int) -> SyncReport:
        key = (model_version_id, kind)
        with self._key_lock(key), self.sessions() as session:
            live, report = self._rebuild(session, key, dim)
            self._live[key] = live
        return report

    def save(self) -> dict[tuple[int, str], Manifest]:
        saved = {}
        for key in list(self._live):
            with self._key_lock(key):
                live = self._live[key]
                saved[key] = save_with_owners(live.index, live.owners, self._path(*key), live.position)
        return saved

    # -- writes -------------------------------------------------------------------------------

    def add_embeddings(self, session: Session, model_version_id: int, dims: Mapping[str, int],
                       items: Sequence[NewEmbedding]) -> list[int]:
        """Insert rows in ``session``'s transaction (with whatever else it holds) and commit, then
        add them to the loaded indexes. ``dims`` gives the vector dimension of each kind.

        A crash between the commit and the index update loses nothing: the rows are in the change
        log, which every process applies at its next refresh or start.
        """
        unknown = {item.kind for item in items} - set(KINDS)
        if unknown:
            raise ValueError(f"kind must be one of {KINDS}, got {sorted(unknown)}")
        kinds = {item.kind for item in items}
        for kind in kinds:
            self._get((model_version_id, kind), dims[kind])  # opened (or rebuilt) before the new rows exist
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
        for kind in kinds:
            chosen = [(row, item.vector) for row, item in zip(rows, items, strict=True) if item.kind == kind]
            ids = np.array([row.id for row, _ in chosen], dtype=np.int64)
            key = (model_version_id, kind)
            with self._key_lock(key):
                live = self._live[key]
                new = ~live.owners.contains(ids)  # a concurrent catch-up may have added them already
                live.owners.add(ids[new], np.array([row.image_id for row, _ in chosen], dtype=np.int64)[new])
                live.index.add(ids[new], np.stack([vector for _, vector in chosen])[new])
                live.generation = next(_GENERATIONS)
            self._maybe_grow(key)
        return [row.id for row in rows]

    def remove_images(self, session: Session, image_ids: Sequence[int]) -> int:
        """Delete images (their embeddings cascade) and drop their vectors from loaded indexes."""
        doomed = session.execute(select(Embedding.id, Embedding.model_version_id, Embedding.kind)
                                 .where(Embedding.image_id.in_(list(image_ids)))).all()
        session.execute(delete(Embedding).where(Embedding.image_id.in_(list(image_ids))))
        session.execute(delete(Image).where(Image.id.in_(list(image_ids))))
        session.commit()
        for key in list(self._live):
            ids = np.array([d[0] for d in doomed if (d[1], d[2]) == key], dtype=np.int64)
            with self._key_lock(key):
                live = self._live[key]
                live.index.remove(ids)
                live.owners.remove(ids)
                live.generation = next(_GENERATIONS)
            self._maybe_grow(key)  # a graph's tombstones past its share: rebuilt
        return len(doomed)

    # -- search -------------------------------------------------------------------------------

    def search(self, model_version_id: int, kind: str, queries: np.ndarray, k: int = 10, *,
               filters: Filters | None = None, offset: int = 0, min_score: float | None = None,
               recall: float | None = None, nprobe: int | None = None) -> list[list[Hit]]:
        """Top hits per query row, best first; ``offset`` skips that many for paging. ``recall``:
        the recall@10 target (default ``params.recall``); ``nprobe`` overrides it (IVF only)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        live = self._get((model_version_id, kind), queries.shape[1])
        filters = filters or Filters()
        allowed = None if filters.empty else self.allowed.get(model_version_id, kind, live.generation, filters)
        hidden = live.hidden
        depth = k + offset
        scores, ids = live.index.search(queries, depth + (0 if hidden is None else len(hidden)), allowed=allowed,
                                        nprobe=nprobe, recall=recall)
        if hidden is not None:
            scores, ids = _without(scores, ids, hidden, depth)
        scores, ids = scores[:, offset:], ids[:, offset:]
        if kind == "image":  # image hits carry no geometry: no SQL needed
            owners = live.owners.lookup(ids)
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


def _without(scores: np.ndarray, ids: np.ndarray, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` hits of each row that are not ``hidden`` (rows stay sorted by score)."""
    gone = np.isin(ids, hidden) | (ids < 0)
    keep = np.argsort(gone, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    missing = np.take_along_axis(gone, keep, axis=1)
    return np.where(missing, -np.inf, scores), np.where(missing, -1, ids)

"""A FAISS index of unit vectors keyed by SQL primary keys, for one (model version, kind).

* Exact (``IndexIDMap2`` over ``IndexFlatIP``) up to ``exact_max`` vectors; past it an IVF index
  (``IndexIVFFlat``, inner product, trained on a sample of ~64 vectors per list) whose ``nprobe``
  is passed per call in ``SearchParametersIVF`` — a shared index is never mutated to serve one
  request. ``nprobe`` comes from a recall target (``index.calibrate``: a curve measured on the
  index's own data when it is built, saved in its manifest); an explicit ``nprobe`` overrides it.
* Filters arrive as the allowed SQL ids: FAISS searches only those (a bitmap over the ids; a hash
  set past ``BITMAP_MAX_ID``). IVF
  widens ``nprobe`` by the filter's selectivity, and probes every list (exact over the allowed set,
  in FAISS, no Python walk) when that is as cheap or the allowed set is small; a widened search
  that finds fewer than ``k`` probes every list, so a filter still returns ``k`` hits when ``k`` exist.
* Past ``compress_past`` vectors, or when full vectors would not fit ``memory_gb``, the index is
  compressed: IVF-PQ codes in RAM (``pq_bytes`` per vector, made in a learned rotation:
  ``index.rotation``), full vectors on disk memory-mapped
  (``index.fullvectors``), and each search re-ranks ``rerank`` x k PQ candidates exactly, so its
  calibrated recall is that of the whole search. Its files live beside the index file.
* With ``IndexParams(graph=True)`` an HNSW graph (``index.graph``) takes IVF's place: its search
  beam is calibrated the same way; removals are tombstones; filtered searches are exact.
* Adds and removes are incremental. On a GPU build with a GPU, unfiltered searches run on a GPU
  copy that is refreshed after removals (GPU indexes cannot remove); the CPU index stays the truth.
* ``outgrown()`` says when the index no longer fits its size (flat past ``exact_max``, IVF ``retrain_factor``
  times larger or smaller than it was trained for); the store then builds a new one in the background.
* A saved index is one file (``index.indexfile``). Opening it maps an IVF index's inverted lists
  (a graph whole) from the file instead of reading them; they are copied into memory before the first add or remove
  (``_own``), beside running searches.
* Searches share the index (a readers-writer lock; FAISS allows concurrent searches on the CPU), and a
  save writes the file beside them. Mutations are exclusive only for their write into the lists: an
  IVF add assigns its vectors to lists before it takes the lock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from index import graph, indexfile
from index.calibrate import Calibration, nprobe_for
from index.fullvectors import FullVectors, remove_unreferenced
from index.indexfile import Manifest
from index.rotation import train_rotation
from index.rwlock import ReadWriteLock
from index.sizing import IndexParams, kind_for, nlist_for, pq_bytes, train_size

__all__ = ["IndexParams", "VectorIndex", "allowed_selector", "kind_for", "nlist_for", "pq_bytes", "train_size"]

MAX_RERANK = 512  # candidates per wanted hit a compressed search may re-rank at most
SPARE = 8  # lists copied from a mapped file get 1/SPARE more room
BITMAP_MAX_ID = 1 << 27  # allowed ids below this are a bitmap (at most 16 MB), a cheaper test than a hash set


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {vectors.shape}")
    return x


class VectorIndex:
    """Thread-safe: searches and saves run together; adds, removes and saves one at a time."""

    def __init__(self, index: faiss.Index, dim: int, params: IndexParams, trained: int = 0,
                 curve: list[tuple[int, float]] | None = None, full: FullVectors | None = None,
                 rerank: int = 0, mapped: bool = False, rotation: np.ndarray | None = None) -> None:
        self.index, self.dim, self.params, self.full = index, dim, params, full
        self.rerank = rerank or params.rerank
        if isinstance(index, faiss.IndexIVFPQ) != (full is not None):
            raise ValueError("a compressed index needs its full vectors, and only it has them")
        if rotation is not None and (full is None or rotation.shape != (dim, dim)):
            raise ValueError("only a compressed index is rotated, by a [dim, dim] matrix")
        self.rotation = rotation  # compressed: PQ codes are of x @ rotation.T (index.rotation)
        self._graph = graph.is_graph(index)
        tuned = self._graph or isinstance(index, faiss.IndexIVF)  # calibrated: nprobe (IVF) or ef (graph)
        self.trained = trained if tuned else 0
        self.curve = [(int(p), float(r)) for p, r in curve or []] if tuned else []
        self._dead = graph.dead(index) if self._graph else 0
        self._lock = ReadWriteLock()  # searches, saves' writes and id reads share; list writes exclude
        self._mutate = threading.Lock()  # one add, remove, calibration or save at a time
        self._gpu_lock = threading.Lock()  # the GPU copy: one search or refresh at a time
        self._gpu: faiss.Index | None = None
        self._gpu_dirty = True
        self._mapped = mapped  # IVF lists (or a graph) are read-only views of the saved file
        self._own_lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, size: int, sample: np.ndarray, params: IndexParams | None = None,
              path: Path | None = None) -> VectorIndex:
        """An empty index of the kind that fits ``size`` vectors; IVF is trained on ``sample``. A
        compressed index keeps its full vectors beside ``path`` (where it will be saved)."""
        params = params or IndexParams()
        kind = kind_for(size, dim, params)
        if kind == "flat":
            return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), dim, params)
        if kind == "hnsw":
            return cls(graph.new(dim), dim, params, trained=size)
        nlist = nlist_for(size, params)
        quantizer = faiss.IndexFlatIP(dim)
        sample, rotation = _as_matrix(sample, dim), None
        if kind == "ivfpq":
            if path is None:
                raise ValueError(f"a compressed index of {size} vectors needs a path for its full vectors")
            ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_bytes(dim, params), 8, faiss.METRIC_INNER_PRODUCT)
            if params.rotate:
                rotation = train_rotation(sample, pq_bytes(dim, params))
                sample = sample @ rotation.T
        else:
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by id
        # faiss's Python wrapper keeps the quantizer alive with the index
        full = FullVectors(path, dim) if path is not None and kind == "ivfpq" else None
        return cls(ivf, dim, params, trained=size, full=full, rotation=rotation)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, params: IndexParams | None = None,
              path: Path | None = None) -> VectorIndex:
        params = params or IndexParams()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        x = _as_matrix(vectors, dim) if len(ids) else np.zeros((0, dim), np.float32)
        sample = x
        if len(ids) > params.exact_max:
            rng = np.random.default_rng(0)
            sample = x[rng.choice(len(x), size=train_size(len(x), params, dim), replace=False)]
        index = cls.empty(dim, len(ids), sample, params, path)
        calibration = Calibration(sample) if index.kind != "flat" else None
        index.add(ids, x)
        if calibration is not None:
            calibration.observe(ids, x)
            index.calibrate(calibration)
        return index

    def calibrate(self, calibration: Calibration) -> None:
        """Measure the recall curve of this IVF index (or graph) against ``calibration``'s exact
        top-10 (which must have observed every vector added)."""
        def search(q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
            return self._search(q, k, None, nprobe)[1]

        with self._mutate, self._lock.write():
            nlist = self._ceiling()
            # Compressed: first enough candidates that probing every list finds 99 % of the true top-10
            # (PQ distances alone rank too coarsely for that), then the nprobe curve at that depth.
            while self.full is not None and self.rerank < MAX_RERANK and calibration.recall(search, nlist) < 0.99:
                self.rerank *= 2
            self.curve = calibration.curve(search, nlist, first=10 if self._graph else 1)

    def nprobe(self, recall: float | None = None, nprobe: int | None = None) -> int:
        """Lists an IVF search probes (a graph's beam): ``nprobe`` if given, else the calibrated
        value for ``recall``."""
        nlist = self._ceiling()
        if nprobe or self.params.nprobe:
            return max(1, min(nlist, int(nprobe or self.params.nprobe or 1)))
        return nprobe_for(self.curve, self.params.recall if recall is None else recall, nlist)

    def outgrown(self) -> bool:
        """True when another kind (or a retrained IVF) fits the current size better."""
        if not self.params.follow_size:
            return False
        # a compressed index is not decompressed while it is smaller than it was trained for
        size = max(self.ntotal, self.trained) if self.kind == "ivfpq" else self.ntotal
        if self.kind != kind_for(size, self.dim, self.params):
            return True
        if self.kind == "flat":
            return False
        if self._dead > graph.MAX_DEAD * (self.ntotal + self._dead):
            return True
        if not self.curve:  # saved before calibration existed: rebuild (and calibrate) once
            return True
        factor = self.params.retrain_factor
        return self.ntotal > factor * self.trained or self.ntotal * factor < self.trained

    @property
    def kind(self) -> str:
        if isinstance(self.index, faiss.IndexIVF):
            return "ivfpq" if self.full is not None else "ivf"
        return "hnsw" if self._graph else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - self._dead

    def _ceiling(self) -> int:
        """The widest ``nprobe`` (every list), or a graph's beam past which it searches exactly."""
        return graph.MAX_EF + 1 if self._graph else int(self.index.nlist)

    def ids(self) -> np.ndarray:
        with self._lock.read():
            if isinstance(self.index, faiss.IndexIVF):
                invlists = self.index.invlists
                parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                         for i in range(self.index.nlist) if invlists.list_size(i)]
                return np.concatenate(parts) if parts else np.zeros(0, np.int64)
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            return ids[ids >= 0]  # a graph's tombstones are -1

    def manifest(self, position: int = 0) -> Manifest:
        return Manifest(self.dim, self.kind, self.ntotal, position, self.trained, self.curve or None,
                        rerank=self.rerank if self.full is not None else 0, rotated=self.rotation is not None)

    # -- mutation -----------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        x = _as_matrix(vectors, self.dim)
        coded = self._rotated(x)
        self._own()
        with self._mutate:
            if self._graph:  # linking into the graph is slow: a slice at a time, searches run between
                for at in range(0, len(ids), graph.ADD_SLICE):
                    with self._lock.write():
                        self.index.add_with_ids(x[at:at + graph.ADD_SLICE], ids[at:at + graph.ADD_SLICE])
                return
            ivf = isinstance(self.index, faiss.IndexIVF)
            # the costly part, each vector's nearest list, reads only the quantizer: searches go on
            lists = self.index.quantizer.search(coded, 1)[1].ravel() if ivf else None
            with self._lock.write():
                if self.full is not None:
                    self.full.add(ids, x)  # first: a search never finds an id whose vector is not there
                if lists is not None:
                    self.index.add_core(len(x), faiss.swig_ptr(coded), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
                else:
                    self.index.add_with_ids(x, ids)
                if self._gpu is not None:
                    with self._gpu_lock:
                        self._gpu.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        if self._graph:  # tombstones in the id map, which is never mapped: no copy (waits for one running)
            with self._own_lock, self._mutate, self._lock.write():
                removed = graph.remove(self.index, ids)
                self._dead += removed
                return removed
        self._own()
        with self._mutate, self._lock.write():
            # IVF's id hashtable removes only through an IDSelectorArray.
            removed = int(self.index.remove_ids(faiss.IDSelectorArray(ids)))
            self._gpu_dirty = True
            return removed

    @property
    def mapped(self) -> bool:
        return self._mapped

    def _own(self) -> None:
        """Copy what is mapped from the file (the inverted lists and the coarse quantizer) into
        memory: FAISS aborts the process on a write to a mapped list, and the last mapped part
        keeps the file's pages (and a replaced file's inode) held. The copy runs beside searches,
        which only read the mapped parts; only the swap takes the lock. Every mutation calls this
        first, so none can run during the copy."""
        if not self._mapped:
            return
        with self._own_lock:
            if not self._mapped:
                return
            if self._graph:
                copy = graph.owned(self.index)
                with self._lock.write():
                    self.index, self._mapped = copy, False
                return
            ivf = faiss.extract_index_ivf(self.index)
            mapped = ivf.invlists
            owned = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            for i in range(ivf.nlist):
                if size := mapped.list_size(i):
                    # Room to grow (a resize down keeps the capacity): the next adds, spread over
                    # every list, would otherwise reallocate each list inside the write lock.
                    owned.resize(i, size + size // SPARE + 4)
                    owned.resize(i, 0)
                    owned.add_entries(i, size, mapped.get_ids(i), mapped.get_codes(i))
            old_quantizer = ivf.quantizer
            quantizer = faiss.IndexFlat(ivf.d, old_quantizer.metric_type)
            quantizer.add(old_quantizer.reconstruct_n(0, old_quantizer.ntotal))
            with self._lock.write():
                owned.this.disown()  # the index owns the copies from here on
                ivf.replace_invlists(owned, True)  # deletes the mapped lists
                quantizer.this.disown()
                ivf.quantizer = quantizer  # the index owns its fields (read_index sets own_fields)
                old_quantizer.this.acquire()  # deleted with this proxy: the index no longer points to it
                self._mapped = False
                self._gpu_dirty = True
            del old_quantizer

    # -- search -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None, recall: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: (scores [n, k], ids [n, k]); missing hits are id -1, score -inf.
        ``recall``: the recall@10 target (default ``params.recall``); ``nprobe`` overrides it."""
        q = _as_matrix(queries, self.dim)
        k = max(1, int(k))
        with self._lock.read():
            ivf = isinstance(self.index, faiss.IndexIVF)
            probe = self.nprobe(recall, nprobe) if ivf or self._graph else 0
            if allowed is None:
                return self._search(q, k, None, probe)
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():  # the store's are sorted already
                allowed = np.unique(allowed)
            selector = allowed_selector(allowed)  # once: a widened search may run twice
            if not ivf:  # flat, or a graph: exact over the allowed ids
                return self._search(q, k, selector, 0)
            nlist = int(self.index.nlist)
            share = len(allowed) / max(1, self.ntotal)
            widened = min(nlist, math.ceil(probe / max(share, 1e-9)))
            if len(allowed) <= self.params.exact_filter_max or widened * 2 >= nlist:
                return self._search(q, k, selector, nlist)  # every list: exact over the allowed ids
            scores, ids = self._search(q, k, selector, widened)
            if (ids < 0).any() and len(allowed) >= k:
                return self._search(q, k, selector, nlist)  # too few lists for this filter
            return scores, ids

    def _search(self, q: np.ndarray, k: int, selector: faiss.IDSelector | None, nprobe: int
                ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        if self.full is not None:
            _, candidates = self.index.search(self._rotated(q), k * self.rerank, params=params)
            return self._rerank(q, k, candidates)  # the full vectors are not rotated: nor is q here
        if self._graph:
            scores, ids = graph.search(self.index, q, k, nprobe, selector, self._dead > 0)
        elif selector is None and self._use_gpu():
            with self._gpu_lock:
                scores, ids = self._gpu_index().search(q, k)
        else:
            scores, ids = self.index.search(q, k, params=params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _rotated(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the PQ codes see it (itself when the index is not rotated)."""
        return x if self.rotation is None else np.ascontiguousarray(x @ self.rotation.T)

    def _rerank(self, q: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k of each query among its PQ candidates (``rerank`` x k of them, so at least
        k), scored on the full vectors."""
        assert self.full is not None
        exact = self.full.inner_products(q, candidates)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(exact, top, axis=1)
        ids = np.where(np.isfinite(scores), np.take_along_axis(candidates, top, axis=1), -1)
        return scores, ids

    def _use_gpu(self) -> bool:
        if self._graph:  # FAISS has no GPU HNSW
            return False
        use = self.params.use_gpu
        if use is None:
            use = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        return bool(use)

    def _gpu_index(self) -> faiss.Index:
        """The GPU copy, made again after removals (GPU indexes cannot remove). Caller holds ``_gpu_lock``."""
        if self._gpu is None or self._gpu_dirty:
            self._resources = getattr(self, "_resources", None) or faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
            self._gpu_dirty = False
        return self._gpu

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: Path, position: int = 0, owners: tuple[np.ndarray, np.ndarray] | None = None
             ) -> Manifest:
        """Write ``path`` (``index.indexfile``): the index, the manifest (with the change-log
        ``position`` this index covers) and the id -> image id arrays when given (``owners``,
        exactly the index's ids)."""
        if self.full is not None and self.full.path.resolve() != path.resolve():
            raise ValueError(f"a compressed index is saved where its full vectors are ({self.full.path}), not {path}")
        with self._mutate:  # no add or remove until the file is written
            manifest = self.manifest(position)
            if owners is not None:
                if len(owners[0]) != self.ntotal or len(owners[1]) != self.ntotal:
                    raise ValueError(f"owners of {len(owners[0])} ids for an index of {self.ntotal}")
                manifest = replace(manifest, owners=True)
            segments = []
            if self.full is not None:
                with self._lock.write():  # closing the growing file changes what re-ranking reads
                    segments = self.full.persist()
            if segments:
                manifest = replace(manifest, segments=[(n, len(i)) for n, i in segments])
            with self._lock.read():  # searches go on while the file is written
                indexfile.write(path, self.index, manifest, owners, segments, self.rotation)
        if self.full is not None:  # only a compressed index has segment files to look for
            remove_unreferenced(path, {name for name, _ in manifest.segments or []})
        return manifest

    @classmethod
    def load(cls, path: Path, params: IndexParams | None = None) -> tuple[VectorIndex, Manifest]:
        """Raises (FileNotFoundError, RuntimeError, ValueError) on a missing or corrupt file."""
        index, manifest, _ = cls.load_with_owners(path, params)
        return index, manifest

    @classmethod
    def load_with_owners(cls, path: Path, params: IndexParams | None = None
                         ) -> tuple[VectorIndex, Manifest, tuple[np.ndarray, np.ndarray] | None]:
        """The index (an IVF index's lists mapped from the file, see ``index.indexfile``), its
        manifest and the id -> image id arrays saved with it (None in a file written without
        them). Raises like ``load``."""
        saved = indexfile.read(path)
        index, manifest = saved.index, saved.manifest
        full = FullVectors(path, manifest.dim, saved.segments) if isinstance(index, faiss.IndexIVFPQ) else None
        if not isinstance(index, faiss.IndexIDMap2 | faiss.IndexIVF):
            raise ValueError(f"{path}: unexpected index type {type(index).__name__}")
        loaded = cls(index, index.d, params or IndexParams(), trained=manifest.trained, curve=manifest.curve,
                     full=full, rerank=manifest.rerank, mapped=saved.mapped, rotation=saved.rotation)
        if (loaded.ntotal, loaded.dim, loaded.kind) != (manifest.count, manifest.dim, manifest.kind):
            raise ValueError(f"{path}: holds {loaded.ntotal} {loaded.kind} vectors of dimension {loaded.dim}, "
                             f"manifest says {manifest}")
        return loaded, manifest, saved.owners


def allowed_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """FAISS's test for "is this id allowed" over sorted unique ``allowed``: one bit per id up to the
    largest (ids are SQL keys counting from 1), so scanning a list costs a bit test per entry."""
    if not len(allowed) or allowed[0] < 0 or allowed[-1] >= BITMAP_MAX_ID:
        return faiss.IDSelectorBatch(allowed)
    bits = np.zeros(int(allowed[-1]) // 8 + 1, np.uint8)
    byte = allowed >> 3
    first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])  # ids sharing a byte are neighbours
    bits[byte[first]] = np.bitwise_or.reduceat((1 << (allowed & 7)).astype(np.uint8), first)
    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    selector.bits = bits  # FAISS reads the array in place: keep it alive with the selector
    return selector

"""A FAISS index of unit vectors keyed by SQL primary keys, for one (model version, kind).

* Exact (``IndexIDMap2`` over ``IndexFlatIP``) up to ``exact_max`` vectors; past it an IVF index
  (``IndexIVFFlat``, inner product, trained on a sample) whose ``nprobe`` is passed per call in
  ``SearchParametersIVF`` — a shared index is never mutated to serve one request.
* Filters arrive as the allowed SQL ids: FAISS searches only those (``IDSelectorBatch``); a small
  allowed set is scored exactly from the stored vectors, and an IVF search that finds fewer than
  ``k`` falls back to exact, so a selective filter still returns ``k`` hits when ``k`` exist.
* Adds and removes are incremental. On a GPU build with a GPU, unfiltered searches run on a GPU
  copy that is refreshed after removals (GPU indexes cannot remove); the CPU index stays the truth.
* ``outgrown()`` says when the index no longer fits its size (flat past ``exact_max``, IVF ``retrain_factor``
  times larger or smaller than it was trained for); the store then builds a new one in the background.
* A saved index is one file: a header with its manifest, then the FAISS index. It is written to a
  unique temporary name in the same folder and renamed over the old one, so concurrent savers never
  mix one's manifest with another's vectors (the last rename wins) and a failed save leaves nothing.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

MAGIC = b"XDLIDX1\n"

@dataclass(frozen=True)
class IndexParams:
    exact_max: int = 20_000  # flat up to here: one exact query costs ~2 ms at 20k (bench/search.py)
    nlist: int | None = None  # IVF lists; None: 4*sqrt(n), at least 16
    nprobe: int = 32  # default IVF lists searched, overridable per call
    exact_filter_max: int = 20_000  # allowed sets up to this size are scored exactly
    train_sample: int = 100_000
    use_gpu: bool | None = None  # None: when faiss has GPUs
    retrain_factor: float = 4.0  # an IVF index this many times larger or smaller than trained is rebuilt
    follow_size: bool = True  # False: keep the kind chosen at build time (the old behaviour, for benches)


@dataclass(frozen=True)
class Manifest:
    """What a saved index holds: its kind, size, and the change-log position it covers."""

    dim: int
    kind: str  # flat | ivf
    count: int
    position: int = 0  # the last embedding_changes.seq applied
    trained: int = 0  # IVF: the number of vectors it was trained for


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {vectors.shape}")
    return x


class VectorIndex:
    """Thread-safe: searches share a lock with mutations (FAISS allows concurrent searches only)."""

    def __init__(self, index: faiss.Index, dim: int, params: IndexParams, trained: int = 0) -> None:
        self.index, self.dim, self.params = index, dim, params
        self.trained = trained if isinstance(index, faiss.IndexIVF) else 0
        self._lock = threading.RLock()
        self._gpu: faiss.Index | None = None
        self._gpu_dirty = True

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, size: int, sample: np.ndarray, params: IndexParams | None = None) -> VectorIndex:
        """An empty index of the kind that fits ``size`` vectors; IVF is trained on ``sample``."""
        params = params or IndexParams()
        if size <= params.exact_max:
            return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), dim, params)
        nlist = params.nlist or max(16, int(4 * np.sqrt(size)))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(_as_matrix(sample, dim))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by id
        # faiss's Python wrapper keeps the quantizer alive with the index
        return cls(ivf, dim, params, trained=size)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, params: IndexParams | None = None
              ) -> VectorIndex:
        params = params or IndexParams()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        x = _as_matrix(vectors, dim) if len(ids) else np.zeros((0, dim), np.float32)
        sample = x
        if len(ids) > params.exact_max:
            rng = np.random.default_rng(0)
            sample = x[rng.choice(len(x), size=min(len(x), params.train_sample), replace=False)]
        index = cls.empty(dim, len(ids), sample, params)
        index.add(ids, x)
        return index

    def outgrown(self) -> bool:
        """True when another kind (or a retrained IVF) fits the current size better."""
        if not self.params.follow_size:
            return False
        if self.kind == "flat":
            return self.ntotal > self.params.exact_max
        factor = self.params.retrain_factor
        return self.ntotal > factor * self.trained or self.ntotal * factor < self.trained

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        with self._lock:
            if isinstance(self.index, faiss.IndexIVF):
                invlists = self.index.invlists
                parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                         for i in range(self.index.nlist) if invlists.list_size(i)]
                return np.concatenate(parts) if parts else np.zeros(0, np.int64)
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def manifest(self, position: int = 0) -> Manifest:
        return Manifest(self.dim, self.kind, self.ntotal, position, self.trained)

    # -- mutation -----------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        x = _as_matrix(vectors, self.dim)
        with self._lock:
            self.index.add_with_ids(x, ids)
            if self._gpu is not None:
                self._gpu.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        with self._lock:
            # IVF's id hashtable removes only through an IDSelectorArray.
            removed = int(self.index.remove_ids(faiss.IDSelectorArray(ids)))
            self._gpu_dirty = True
            return removed

    # -- search -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: (scores [n, k], ids [n, k]); missing hits are id -1, score -inf."""
        q = _as_matrix(queries, self.dim)
        k = max(1, int(k))
        with self._lock:
            if allowed is not None:
                allowed = np.unique(np.asarray(allowed, dtype=np.int64))
                if len(allowed) <= self.params.exact_filter_max:
                    return self._exact(q, k, allowed)
                scores, ids = self._search(q, k, allowed, nprobe)
                if isinstance(self.index, faiss.IndexIVF) and (ids < 0).any() and len(allowed) >= k:
                    return self._exact(q, k, allowed)  # IVF probed too few lists for this filter
                return scores, ids
            return self._search(q, k, None, nprobe)

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None,
                nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        selector = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if isinstance(self.index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.params.nprobe)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        gpu = self._gpu_index() if selector is None else None
        scores, ids = (gpu or self.index).search(q, k, params=None if gpu is not None else params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = allowed[self._contains(allowed)]
        vectors = self.index.reconstruct_batch(present) if len(present) else np.zeros((0, self.dim), np.float32)
        sims = q @ vectors.T
        n = min(k, len(present))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if n:
            top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, 1)
            scores[:, :n] = np.take_along_axis(sims, top, 1)
            ids[:, :n] = present[top]
        return scores, ids

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self.ids())

    def _gpu_index(self) -> faiss.Index | None:
        use = self.params.use_gpu
        if use is None:
            use = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if not use:
            return None
        if self._gpu is None or self._gpu_dirty:
            self._resources = getattr(self, "_resources", None) or faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
            self._gpu_dirty = False
        return self._gpu

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: Path, position: int = 0) -> Manifest:
        """Write ``path``: the manifest (with the change-log ``position`` this index covers) and the
        index in one file, through a unique temporary file that is renamed over ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f, self._lock:
                manifest = self.manifest(position)
                header = json.dumps(asdict(manifest)).encode()
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        return manifest

    @classmethod
    def load(cls, path: Path, params: IndexParams | None = None) -> tuple[VectorIndex, Manifest]:
        """Raises (FileNotFoundError, RuntimeError, ValueError) on a missing or corrupt file."""
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{path}: not an xdlabel index file")
            size = int.from_bytes(f.read(8), "little")
            if size > 1 << 16:
                raise ValueError(f"{path}: corrupt header")
            manifest = Manifest(**json.loads(f.read(size)))
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        if not isinstance(index, faiss.IndexIDMap2 | faiss.IndexIVF):
            raise ValueError(f"{path}: unexpected index type {type(index).__name__}")
        loaded = cls(index, index.d, params or IndexParams(), trained=manifest.trained)
        if (loaded.ntotal, loaded.dim, loaded.kind) != (manifest.count, manifest.dim, manifest.kind):
            raise ValueError(f"{path}: holds {loaded.ntotal} {loaded.kind} vectors of dimension {loaded.dim}, "
                             f"manifest says {manifest}")
        return loaded, manifest

    @staticmethod
    def remove_stale_temps(path: Path) -> int:
        """Delete temporary files that writers on this host left for ``path`` when they died."""
        removed = 0
        prefix = _temp_prefix(path)
        for tmp in path.parent.glob(f"{prefix}*.tmp"):
            pid = tmp.name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with suppress(FileNotFoundError):
                    tmp.unlink()
                    removed += 1
        return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""The graph kind of ``index.vectors``: FAISS HNSW over the vectors, keyed by SQL ids.

* ``IndexIDMap2`` over ``IndexHNSWFlat`` (inner product). A search walks the graph with ``efSearch``
  candidates, calibrated to the recall target like IVF's ``nprobe`` (``index.calibrate``).
* HNSW cannot remove a vector, so a removal is a tombstone: the id map's entry becomes -1. Searches
  then pass a selector that FAISS applies to the mapped ids, so tombstones never take a result's
  place; they still route the graph's walks. A graph whose tombstones pass ``MAX_DEAD`` of it is
  rebuilt (``VectorIndex.outgrown``). The tombstones are saved with the id map, in the FAISS file.
* Filtered searches score the allowed vectors exactly (the graph's own flat storage, with the
  filter tested on each vector's id before its product): recall 1.0 at any selectivity, where a
  graph walk through mostly disallowed vectors would need a far wider beam.
* A saved graph opens mapped (``IO_FLAG_MMAP_IFC`` maps the storage and the graph); it is copied
  into memory before the first add (``owned``). Removals only write the id map, which is never mapped.
"""

from __future__ import annotations

import tempfile

import faiss
import numpy as np

M = 32  # neighbours per node: FAISS's HNSW32, the raw FAISS row of bench/search.py
EF_CONSTRUCTION = 64  # build beam: past FAISS's 40 for recall on hard (CLIP-like) sets, at half the build of 128
MAX_EF = 4096  # the widest search beam calibration tries; a target past it searches exactly
MAX_DEAD = 0.25  # share of tombstones past which the graph is rebuilt
ADD_SLICE = 256  # vectors linked per hold of the write lock: ~0.13 s at 1024-d on one thread (0.5 ms each)
LIVE = faiss.IDSelectorRange(0, 1 << 62)  # every id but the tombstones' -1


def new(dim: int) -> faiss.IndexIDMap2:
    graph = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = EF_CONSTRUCTION
    return faiss.IndexIDMap2(graph)


def is_graph(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW)


def id_map(index: faiss.IndexIDMap2) -> np.ndarray:
    """A writable view of the id map: position in the graph -> SQL id (-1: removed)."""
    return faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size()) if index.id_map.size() \
        else np.zeros(0, np.int64)


def dead(index: faiss.IndexIDMap2) -> int:
    """Tombstoned positions of a graph."""
    return int((id_map(index) < 0).sum())


def remove(index: faiss.IndexIDMap2, ids: np.ndarray) -> int:
    """Tombstone ``ids``; returns how many were in the graph. The caller excludes searches."""
    positions = id_map(index)
    hit = np.flatnonzero(np.isin(positions, ids))
    positions[hit] = -1
    return len(hit)


def search(index: faiss.IndexIDMap2, q: np.ndarray, k: int, ef: int, selector: faiss.IDSelector | None,
           has_dead: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the live vectors: through the graph with beam ``ef``; exact over the allowed ids
    with a ``selector`` of SQL ids, or with ``ef`` past ``MAX_EF``."""
    if selector is None and ef <= MAX_EF:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        if has_dead:
            params.sel = LIVE  # IndexIDMap2 tests it on the SQL id
        return index.search(q, k, params=params)
    storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
    params = faiss.SearchParameters()
    params.sel = faiss.IDSelectorTranslated(index.id_map, selector or LIVE)  # positions -> SQL ids
    scores, positions = storage.search(q, k, params=params)
    return scores, np.where(positions >= 0, id_map(index)[np.maximum(positions, 0)], -1)


def owned(index: faiss.IndexIDMap2) -> faiss.IndexIDMap2:
    """An in-memory copy of a graph mapped from its file (FAISS aborts on an add to a mapped one),
    through a temporary file so the copy is the only one in anonymous memory."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:
        faiss.write_index(index, tmp.name)
        return faiss.read_index(tmp.name)

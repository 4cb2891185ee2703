"""Which index fits a corpus: its kind (exact, IVF, graph, compressed) and sizes, from ``IndexParams``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IndexParams:
    exact_max: int = 20_000  # flat up to here: one exact query costs ~2 ms at 20k (bench/search.py)
    nlist: int | None = None  # IVF lists; None: 4*sqrt(n), at least 16
    recall: float = 0.95  # recall@10 target of IVF searches, overridable per call
    nprobe: int | None = None  # expert override of the calibrated nprobe (also per call)
    exact_filter_max: int = 20_000  # allowed sets up to this size are scored exactly
    train_sample: int | None = None  # IVF training vectors; None: 64 per list (FAISS asks for >= 39)
    use_gpu: bool | None = None  # None: when faiss has GPUs
    retrain_factor: float = 4.0  # an IVF index this many times larger or smaller than trained is rebuilt
    follow_size: bool = True  # False: keep the kind chosen at build time (the old behaviour, for benches)
    compress_past: int = 5_000_000  # IVF-PQ + on-disk re-ranking past this many vectors
    memory_gb: float | None = None  # ... or when full vectors of one index would take more RAM than this
    pq_bytes: int | None = None  # PQ code size; None: dim / 8 (32x smaller than float32)
    rerank: int = 16  # compressed: PQ candidates re-scored exactly per wanted hit (calibration may raise it)
    rotate: bool = True  # compressed: encode in a learned rotation (OPQ); False: plain PQ (the baseline)
    graph: bool = False  # HNSW (index.graph) instead of IVF between exact_max and the compressed sizes


def nlist_for(size: int, params: IndexParams) -> int:
    return params.nlist or max(16, int(4 * np.sqrt(size)))


def kind_for(size: int, dim: int, params: IndexParams) -> str:
    if size <= params.exact_max:
        return "flat"
    too_big = params.memory_gb is not None and size * dim * 4 > params.memory_gb * 2**30
    if size > params.compress_past or too_big:
        return "ivfpq"
    return "hnsw" if params.graph else "ivf"


def pq_bytes(dim: int, params: IndexParams) -> int:
    """Code bytes per vector: a divisor of ``dim`` (FAISS splits the vector into that many parts)."""
    wanted = params.pq_bytes or max(1, dim // 8)
    return max(m for m in range(1, min(wanted, dim) + 1) if dim % m == 0)


def train_size(size: int, params: IndexParams, dim: int = 0) -> int:
    """IVF training vectors for ``size``: grows with nlist, so every list gets enough points (and
    a compressed index's 256 PQ centroids per part get the 39 points each that FAISS asks for)."""
    wanted = params.train_sample or 64 * nlist_for(size, params)
    if dim and kind_for(size, dim, params) == "ivfpq":
        wanted = max(wanted, 64 * 256)
    if dim and kind_for(size, dim, params) == "hnsw":  # nothing to train: the calibration queries' sample
        wanted = 4096
    return min(size, wanted)

"""A seeded, generated vector set shaped like xdlabel's real workload (no download).

Image vectors: 1024-d by default, a decaying spectrum (dimension j has scale (j + 1) ** -0.6, so a
few directions carry most of the variance, as in CLIP-style embeddings) and many overlapping
clusters (one per ~100 vectors, the spread within a cluster as large as between them). Queries come
from another distribution, the way text queries differ from images: a cluster centre, a fixed
offset shared by every query (the modality gap) and broad noise, so that the best cosine of a query
is ~0.3 instead of ~0.9. Every vector has a ``bucket`` in 0..99, uniform and independent of the
vector, which gives filters of 1 % (bucket 0) and 10 % (bucket < 10) selectivity.

    from bench.realistic import realistic
    data = realistic(250_000)          # data.base, data.queries, data.buckets
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Realistic", "realistic", "exact_top"]


@dataclass(frozen=True)
class Realistic:
    base: np.ndarray  # [n, dim] float32 unit rows; row i is SQL id i + 1 in the benches
    queries: np.ndarray  # [q, dim] float32 unit rows
    buckets: np.ndarray  # [n] int: bucket 0 is a 1 % filter, buckets < 10 a 10 % filter


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def realistic(n: int, num_queries: int = 1000, dim: int = 1024, seed: int = 0, chunk: int = 50_000) -> Realistic:
    rng = np.random.default_rng(seed)
    scale = (np.arange(dim, dtype=np.float32) + 1) ** -0.6
    centers = rng.standard_normal((max(16, n // 100), dim)).astype(np.float32) * scale
    base = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):  # chunked: the noise of all rows at once would double the peak
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * scale
        base[start:start + m] = _unit(centers[rng.integers(0, len(centers), m)] + noise)
    gap = rng.standard_normal(dim).astype(np.float32) * scale
    picked = centers[rng.integers(0, len(centers), num_queries)]
    broad = rng.standard_normal((num_queries, dim)).astype(np.float32)  # isotropic: off the data's spectrum
    queries = _unit(picked + 1.5 * gap + broad * scale + 0.25 * broad)
    return Realistic(base, queries, rng.integers(0, 100, n))


def exact_top(base: np.ndarray, queries: np.ndarray, k: int = 10, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products (scores, row positions), streamed over ``base`` in chunks."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(base), chunk):
        sims = queries @ base[start:start + chunk].T
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.arange(start, start + sims.shape[1])[None].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)

"""IVF parameters (and a graph's search beam) chosen for a recall target on the index's own data.

When an IVF index (or graph) is built, a few hundred of its sampled vectors become calibration queries,
moved off the data the way text queries sit off image vectors (each is a stored vector plus the
difference of two other stored vectors, a shift with the data's own covariance, plus broad
isotropic noise). Their exact top-10 is accumulated while the vectors stream into the index; then
recall@10 is measured at a ladder of ``nprobe`` values (a graph: of ``efSearch`` values). The
curve is saved in the manifest, and a search asking for recall ``r`` probes the fewest lists whose
calibrated recall reaches ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["Calibration", "ladder", "nprobe_for"]

K = 10
QUERIES = 300
SHIFT = 1.0  # weight of the per-query shift (a difference of two stored vectors)
NOISE = 1.0  # norm of the isotropic noise, relative to a unit stored vector
# Calibration queries are still easier than real text queries (on bench/realistic.py's queries the
# index falls short of the calibrated recall at the same nprobe; bench/search.py prints both): a
# target allows only this share of its misses.
MISS_SHARE = 0.5


def ladder(nlist: int, first: int = 1) -> list[int]:
    """nprobe values (a graph's beams) tried from ``first``: about 1.25x apart, ending at nlist (exhaustive)."""
    steps, p = [], first
    while p < nlist:
        steps.append(p)
        p = max(p + 1, int(p * 1.25))
    return [*steps, nlist]


def nprobe_for(curve: list[tuple[int, float]], recall: float, nlist: int) -> int:
    """The fewest lists whose calibrated recall@10 reaches ``recall`` (with the margin above); all
    of them without a curve or past its end."""
    if recall >= 1:  # exact: every list, whatever the sampled curve says
        return nlist
    wanted = 1 - (1 - recall) * MISS_SHARE
    for nprobe, measured in curve:
        if measured >= wanted:
            return int(nprobe)
    return nlist


class Calibration:
    """Calibration queries and their exact top-10, accumulated over the vectors as they are added."""

    def __init__(self, sample: np.ndarray, seed: int = 0, size: int = QUERIES) -> None:
        """``sample``: [m, dim] stored unit vectors (the IVF training sample)."""
        rng = np.random.default_rng(seed)
        m, dim = sample.shape
        pick = rng.integers(0, m, (3, min(size, m)))
        noise = rng.standard_normal((pick.shape[1], dim)).astype(np.float32) * (NOISE / math.sqrt(dim))
        x = sample[pick[0]] + SHIFT * (sample[pick[1]] - sample[pick[2]]) + noise
        self.queries = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        self._scores: np.ndarray = np.full((len(self.queries), K), -np.inf, np.float32)
        self._ids: np.ndarray = np.full((len(self.queries), K), -1, np.int64)

    def observe(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Fold a chunk of added vectors into the exact top-10 of every query."""
        if not len(ids):
            return
        sims = self.queries @ np.asarray(vectors, np.float32).T
        scores = np.concatenate([self._scores, sims], axis=1)
        idx = np.concatenate([self._ids, np.broadcast_to(np.asarray(ids, np.int64), sims.shape)], axis=1)
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        self._scores, self._ids = np.take_along_axis(scores, top, 1), np.take_along_axis(idx, top, 1)

    def recall(self, search: Callable[[np.ndarray, int, int], np.ndarray], nprobe: int) -> float:
        """Recall@10 of ``search(queries, k, nprobe) -> ids`` against the exact top-10."""
        found = search(self.queries, K, nprobe)
        return float(np.mean([len(set(row[row >= 0].tolist()) & set(f.tolist())) / max(1, int((row >= 0).sum()))
                              for row, f in zip(self._ids, found, strict=True)]))

    def curve(self, search: Callable[[np.ndarray, int, int], np.ndarray], nlist: int, first: int = 1
              ) -> list[tuple[int, float]]:
        """``recall`` at each ``ladder`` step of ``nlist``, up to 0.995."""
        points = []
        for nprobe in ladder(nlist, first):
            recall = self.recall(search, nprobe)
            points.append((nprobe, round(recall, 4)))
            if recall >= 0.995:
                break
        return points

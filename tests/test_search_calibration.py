"""Recall you can ask for: an IVF index calibrates nprobe on its own data when built, and the
default search then reaches the recall target on queries from another (shifted) distribution."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bench.realistic import exact_top, realistic
from index.calibrate import ladder, nprobe_for
from index.vectors import IndexParams, VectorIndex

N, DIM, NLIST = 20_000, 256, 128


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    """The workload-shaped generator (decaying spectrum, overlapping clusters, shifted queries) at
    a test size; ids are SQL-like (not positions)."""
    data = realistic(N, num_queries=400, dim=DIM, seed=3)
    ids = np.arange(N, dtype=np.int64) * 3 + 5
    start = time.perf_counter()
    index = VectorIndex.build(DIM, ids, data.base, IndexParams(exact_max=1000, nlist=NLIST))
    return data, ids, index, time.perf_counter() - start


@pytest.mark.parametrize("target", [0.9, 0.95, 0.98])
def test_default_search_reaches_the_recall_target(built, target: float) -> None:  # type: ignore[no-untyped-def]
    data, ids, index, _ = built
    truth = ids[exact_top(data.base, data.queries, 10)[1]]
    found = VectorIndex(index.index, DIM, IndexParams(exact_max=1000, recall=target), curve=index.curve) \
        .search(data.queries, 10)[1]
    assert recall_at_10(found, truth) >= target
    per_call = index.search(data.queries, 10, recall=target)[1]  # the same target asked per call
    assert np.array_equal(per_call, found)
    chosen = index.nprobe(target)
    assert chosen < NLIST, "calibration fell back to probing every list"
    # the set is hard enough that the target means something: a quarter of the lists misses it
    assert recall_at_10(index.search(data.queries, 10, nprobe=max(1, chosen // 4))[1], truth) < target


def test_nprobe_override_and_the_recorded_curve(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, index, _ = built
    curve = index.curve
    assert curve and [p for p, _ in curve] == ladder(NLIST)[:len(curve)]
    recalls = [r for _, r in curve]
    assert recalls[-1] >= 0.99 and recalls[0] < recalls[-1]
    assert index.nprobe(0.95, nprobe=7) == 7 and index.nprobe(0.95, nprobe=10_000) == NLIST
    assert index.nprobe(0.99) >= index.nprobe(0.95) >= index.nprobe(0.8)
    assert nprobe_for([], 0.95, NLIST) == NLIST  # no curve: every list
    index.save(tmp_path / "i.faiss", position=12)
    loaded, manifest = VectorIndex.load(tmp_path / "i.faiss")
    assert manifest.curve == curve and loaded.curve == curve and manifest.position == 12
    assert loaded.nprobe(0.95) == index.nprobe(0.95)


@pytest.mark.parametrize("share", [1, 10])
def test_filtered_search_keeps_the_recall_target(built, share: int) -> None:  # type: ignore[no-untyped-def]
    """1 % and 10 % filters (the generator's buckets): recall@10 among the allowed vectors."""
    data, ids, index, _ = built
    mask = data.buckets < share
    truth = ids[mask][exact_top(data.base[mask], data.queries, 10)[1]]
    found = index.search(data.queries, 10, allowed=ids[mask])[1]
    assert np.isin(found, ids[mask]).all()
    assert recall_at_10(found, truth) >= 0.95


def test_widened_filtered_search_returns_k_or_probes_every_list(built) -> None:  # type: ignore[no-untyped-def]
    """Filters past exact_filter_max take the widened IVF path; 40 random allowed sets of random
    size (seeded), each checked for k hits inside the set and recall >= 0.95."""
    data, ids, index, _ = built
    widened = VectorIndex(index.index, DIM, IndexParams(exact_max=1000, exact_filter_max=100), curve=index.curve)
    rng = np.random.default_rng(11)
    q = data.queries[:40]
    for trial in range(40):
        mask = rng.random(N) < rng.uniform(0.005, 0.6)
        found = widened.search(q[trial:trial + 1], 10, allowed=ids[mask])[1]
        truth = ids[mask][exact_top(data.base[mask], q[trial:trial + 1], 10)[1]]
        assert np.isin(found, ids[mask]).all() and (found >= 0).all(), trial
        assert recall_at_10(found, truth) >= 0.8, trial  # one query: a single miss is 0.9

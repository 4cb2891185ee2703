"""The FAISS wrapper against brute force: exact and IVF, filters, add/remove, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.vectors import IndexParams, VectorIndex

DIM = 32


def clustered(n: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = q @ x.T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(20_000)
    ids = np.arange(20_000, dtype=np.int64) * 7 + 11  # SQL-like ids, not positions
    return x, ids, clustered(50, seed=1)


@pytest.mark.parametrize("params", [IndexParams(exact_max=50_000), IndexParams(exact_max=1000, nprobe=16)],
                         ids=["flat", "ivf"])
def test_search_agrees_with_brute_force(data, params: IndexParams) -> None:  # type: ignore[no-untyped-def]
    x, ids, q = data
    index = VectorIndex.build(DIM, ids, x, params)
    assert index.kind == ("flat" if params.exact_max > len(ids) else "ivf")
    scores, found = index.search(q, 10)
    truth = brute(x, ids, q, 10)
    assert recall(found, truth) >= (1.0 if index.kind == "flat" else 0.9)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize("params", [IndexParams(exact_max=50_000),
                                    IndexParams(exact_max=1000, nprobe=4, exact_filter_max=50)], ids=["flat", "ivf"])
def test_selective_filter_still_returns_k(data, params: IndexParams) -> None:  # type: ignore[no-untyped-def]
    """1% of the ids allowed: every hit is allowed and all k come back, with exact recall."""
    x, ids, q = data
    index = VectorIndex.build(DIM, ids, x, params)
    rng = np.random.default_rng(2)
    allowed_pos = rng.choice(len(ids), size=len(ids) // 100, replace=False)
    allowed = ids[allowed_pos]
    scores, found = index.search(q, 10, allowed=allowed)
    assert np.isin(found, allowed).all() and (found >= 0).all()
    assert recall(found, brute(x[allowed_pos], allowed, q, 10)) == 1.0


@pytest.mark.parametrize("exact_max", [50_000, 500], ids=["flat", "ivf"])
def test_filters_of_any_shape_search_exactly_the_allowed_ids(exact_max: int) -> None:
    """60 seeded random allowed sets: empty, one id, neighbours sharing a bitmap byte, ids absent
    from the index (0, negative, past its largest), unsorted with repeats, and ids on both sides of
    the bitmap's limit (a hash set there). With every list probed, the hits are exactly brute force
    over the allowed vectors the index holds."""
    from index import vectors

    rng = np.random.default_rng(17)
    ids = np.sort(np.r_[np.arange(1, 1901), rng.choice(np.arange(vectors.BITMAP_MAX_ID - 60,
                                                                  vectors.BITMAP_MAX_ID + 60), 100, replace=False)])
    x = clustered(len(ids), seed=18)
    index = VectorIndex.build(DIM, ids, x, IndexParams(exact_max=exact_max, nlist=16, nprobe=16))
    q = clustered(5, seed=19)
    for trial in range(60):
        shape = trial % 6
        if shape == 0:
            allowed = ids[:0]
        elif shape == 1:
            allowed = rng.choice(ids, 1)
        elif shape == 2:  # runs of neighbours: several ids in one byte of the bitmap
            start = int(rng.integers(1, 1880))
            allowed = np.arange(start, start + int(rng.integers(2, 20)))
        elif shape == 3:  # absent ids mixed in
            allowed = np.r_[rng.choice(ids, int(rng.integers(1, 200))), [0, -5, 10**6, 2**40]]
        elif shape == 4:  # unsorted, with repeats
            allowed = rng.choice(ids, int(rng.integers(10, 400)))
        else:  # mostly the large ids, across the bitmap's limit
            allowed = np.r_[rng.choice(ids[-100:], int(rng.integers(1, 60))), rng.choice(ids[:1900], 5)]
        held = np.isin(ids, allowed)
        scores, found = index.search(q, 10, allowed=allowed)
        k = min(10, int(held.sum()))
        if k == 0:
            assert (found == -1).all(), trial
            continue
        assert np.array_equal(found[:, :k], brute(x[held], ids[held], q, k)), trial
        assert (found[:, k:] == -1).all(), trial


def test_add_remove_and_persistence(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, ids, q = data
    index = VectorIndex.build(DIM, ids[:1000], x[:1000])
    index.add(ids[1000:1100], x[1000:1100])
    assert index.search(x[1050:1051], 1)[1][0, 0] == ids[1050]
    assert index.remove(ids[1050:1051]) == 1
    assert index.search(x[1050:1051], 1)[1][0, 0] != ids[1050]
    path = tmp_path / "i.faiss"
    manifest = index.save(path)
    loaded, read = VectorIndex.load(path)
    assert read == manifest and loaded.ntotal == 1099
    assert np.array_equal(np.sort(loaded.ids()), np.sort(np.delete(ids[:1100], 1050)))


def test_corrupt_file_is_refused(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, ids, _ = data
    path = tmp_path / "i.faiss"
    VectorIndex.build(DIM, ids[:100], x[:100]).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises((RuntimeError, ValueError)):
        VectorIndex.load(path)


def test_wrong_dimension_is_a_clear_error(data) -> None:  # type: ignore[no-untyped-def]
    x, ids, _ = data
    index = VectorIndex.build(DIM, ids[:10], x[:10])
    with pytest.raises(ValueError, match="dimension 32"):
        index.search(np.zeros((1, 5), np.float32), 3)


def test_owner_lookup() -> None:
    from index.store import Owners

    owners = Owners(np.array([30, 10, 20]), np.array([3, 1, 2]))
    owners.add(np.array([40]), np.array([4]))
    owners.remove(np.array([20]))
    assert owners.lookup(np.array([10, 20, 30, 40, 50, -1])).tolist() == [1, -1, 3, 4, -1, -1]
    assert Owners(np.zeros(0), np.zeros(0)).lookup(np.array([1])).tolist() == [-1]

"""Compressed indexes: IVF-PQ codes in RAM, full vectors on disk (memory-mapped) for exact re-ranking.

Recall is calibrated like IVF's (the re-rank depth first, then nprobe), the files survive kill -9
at any point of an add/save loop, random add/remove/save/reopen sequences keep every live vector
exact, and a store past its memory budget builds one from SQL and reopens it without a rebuild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.realistic import exact_top, realistic
from index.fullvectors import FullVectors
from index.indexfile import remove_stale_temps
from index.store import RetrievalStore
from index.vectors import IndexParams, VectorIndex, kind_for
from tests.faultkit import kill_9_rounds
from tests.test_index_growth import add_images, setup_db
from tests.test_search_calibration import recall_at_10
from tests.test_search_restart import no_rebuild
from tests.test_vectors import DIM, clustered

N, BIG_DIM = 12_000, 128
COMPRESSED = IndexParams(exact_max=1000, nlist=64, compress_past=5000)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = realistic(N, num_queries=300, dim=BIG_DIM, seed=5)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    path = tmp_path_factory.mktemp("pq") / "x.faiss"
    return data, ids, VectorIndex.build(BIG_DIM, ids, data.base, COMPRESSED, path=path), path


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_compressed_search_reaches_the_recall_target(built, target: float) -> None:  # type: ignore[no-untyped-def]
    data, ids, index, _ = built
    assert index.kind == "ivfpq" and index.curve and index.rerank >= COMPRESSED.rerank
    truth = ids[exact_top(data.base, data.queries, 10)[1]]
    scores, found = index.search(data.queries, 10, recall=target)
    assert recall_at_10(found, truth) >= target
    # re-ranked scores are exact inner products, in order
    exact = np.einsum("qd,qkd->qk", data.queries, data.base[(found - 3) // 7])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # 16 code bytes per 128-d vector in RAM instead of 512
    assert index.index.code_size == BIG_DIM // 8


def test_saved_and_reopened_compressed_index_answers_the_same(built) -> None:  # type: ignore[no-untyped-def]
    data, _, index, path = built
    manifest = index.save(path, position=9)
    assert manifest.kind == "ivfpq" and manifest.segments and manifest.rerank == index.rerank
    back, again = VectorIndex.load(path, COMPRESSED)
    assert again == manifest and back.kind == "ivfpq" and manifest.rotated
    np.testing.assert_array_equal(back.rotation, index.rotation)  # the codes are read in the rotation they were made in
    for a, b in zip(index.search(data.queries[:50], 10), back.search(data.queries[:50], 10), strict=True):
        np.testing.assert_array_equal(a, b)
    # a segment file cut short is refused, not served
    segment = path.parent / manifest.segments[0][0]
    original = segment.read_bytes()
    segment.write_bytes(original[:-4])
    with pytest.raises(ValueError, match="bytes for"):
        VectorIndex.load(path, COMPRESSED)
    segment.write_bytes(original)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_the_learned_rotation_finds_more_of_the_top_10_than_plain_pq(tmp_path: Path, seed: int) -> None:
    """OPQ (index.rotation) against plain PQ on the same set, 3 seeds: the rotation is orthonormal
    (inner products unchanged), and with the same shallow re-rank (2 candidates per wanted hit,
    every list probed) the rotated codes rank more of the true top-10 into reach."""
    data = realistic(N, num_queries=200, dim=BIG_DIM, seed=seed)
    ids = np.arange(N, dtype=np.int64)
    truth = exact_top(data.base, data.queries, 10)[1]
    recalls = {}
    for rotate in (True, False):
        params = IndexParams(exact_max=1000, nlist=64, compress_past=5000, rotate=rotate)
        index = VectorIndex.build(BIG_DIM, ids, data.base, params, path=tmp_path / f"{rotate}.faiss")
        assert (index.rotation is not None) == rotate
        index.rerank = 2
        recalls[rotate] = recall_at_10(index.search(data.queries, 10, nprobe=64)[1], truth)
        if rotate:
            r = index.rotation.astype(np.float64)
            np.testing.assert_allclose(r @ r.T, np.eye(BIG_DIM), atol=1e-4)
    print(f"seed {seed}: recall@10 at re-rank x2, OPQ {recalls[True]:.3f}, plain PQ {recalls[False]:.3f}")
    assert recalls[True] > recalls[False] + 0.02


def test_memory_budget_chooses_the_compressed_kind() -> None:
    params = IndexParams(exact_max=100, memory_gb=1.0)
    assert kind_for(200_000, 1024, params) == "ivf"  # 0.76 GB of float32
    assert kind_for(300_000, 1024, params) == "ivfpq"  # 1.14 GB
    assert kind_for(300_000, 1024, IndexParams(exact_max=100)) == "ivf"
    assert kind_for(6_000_000, 1024, IndexParams()) == "ivfpq"


def vector_of(ids: np.ndarray, dim: int = DIM) -> np.ndarray:
    """Each id's vector is a function of the id: a reader can check any row it is given."""
    x = np.stack([np.random.default_rng(int(i)).standard_normal(dim) for i in ids]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_random_adds_removes_saves_and_reopens_keep_every_live_vector(tmp_path: Path) -> None:
    """Injects 20 seeded trials of 6-12 random operations (add a batch, remove some, save, reopen from
    the file, re-add a removed id): after each, the index holds exactly the live ids, every live id's
    full vector is the one written, and an exhaustive search finds each query's exact top hit."""
    params = IndexParams(exact_max=50, nlist=8, compress_past=100, pq_bytes=4)
    checked = 0
    for trial in range(20):
        rng = np.random.default_rng(trial)
        path = tmp_path / f"t{trial}" / "x.faiss"
        live = set(range(1, 401))
        ids = np.array(sorted(live), np.int64)
        index = VectorIndex.build(DIM, ids, vector_of(ids), params, path=path)
        next_id = 401
        for _ in range(int(rng.integers(6, 13))):
            op = rng.choice(["add", "remove", "save", "reopen", "readd"])
            if op == "add":
                new = np.arange(next_id, next_id + int(rng.integers(1, 60)), dtype=np.int64)
                next_id += len(new)
                index.add(new, vector_of(new))
                live |= set(new.tolist())
            elif op == "remove" and live:
                gone = rng.choice(sorted(live), size=min(len(live), int(rng.integers(1, 40))), replace=False)
                index.remove(gone)
                live -= set(gone.tolist())
            elif op == "readd" and next_id - 1 > len(live):
                back = np.array([i for i in range(1, next_id) if i not in live][:5], np.int64)
                index.add(back, vector_of(back))
                live |= set(back.tolist())
            elif op == "save":
                index.save(path)
            elif op == "reopen":
                index.save(path)
                index = VectorIndex.load(path, params)[0]
            want = np.array(sorted(live), np.int64)
            assert np.array_equal(np.sort(index.ids()), want)
            assert index.full is not None
            np.testing.assert_array_equal(index.full.get(want), vector_of(want))
            queries = vector_of(rng.choice(want, 5), DIM)
            top = index.search(queries, 1, nprobe=8)[1][:, 0]
            exact = want[np.argmax(queries @ vector_of(want).T, axis=1)]
            assert np.array_equal(top, exact)
            checked += 1
    assert checked >= 120


WRITER = """
import sys, numpy as np
from pathlib import Path
from index.vectors import IndexParams, VectorIndex
from tests.test_compressed_index import vector_of
path, start = Path(sys.argv[1]), int(sys.argv[2])
params = IndexParams(exact_max=50, nlist=8, compress_past=100, pq_bytes=4)
try:
    index = VectorIndex.load(path, params)[0]
except FileNotFoundError:
    ids = np.arange(1, 301, dtype=np.int64)
    index = VectorIndex.build(32, ids, vector_of(ids), params, path=path)
    index.save(path)
print("ready", flush=True)
i = start
while True:
    new = np.arange(i, i + 20, dtype=np.int64)
    index.add(new, vector_of(new))
    index.save(path)
    i += 20
"""


def test_kill_9_during_adds_and_saves_leaves_a_loadable_exact_index(tmp_path: Path) -> None:
    """Injects kill -9 into a process that adds 20 vectors and saves in a loop, 8 times at seeded random
    moments (each run resumes from the file the last one left). After every kill the file loads, every
    id it holds has its exact full vector, and the dead writer's growing file is removed as stale."""
    path = tmp_path / "x.faiss"
    sizes = []
    for _ in kill_9_rounds(WRITER, path, rounds=8, seed=42):
        remove_stale_temps(path)
        assert not list(tmp_path.glob("*.tmp")), "a dead writer's temporary file was left"
        index, manifest = VectorIndex.load(path)
        ids = np.sort(index.ids())
        assert len(ids) == manifest.count and index.full is not None
        np.testing.assert_array_equal(index.full.get(ids), vector_of(ids))
        sizes.append(len(ids))
    assert sizes[-1] > sizes[0] >= 300  # the runs made progress that survived the kills


def test_store_past_its_memory_budget_builds_compressed_and_reopens_without_rebuild(
        migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory budget smaller than the full vectors: the store builds IVF-PQ from SQL, search finds the
    brute-force top-10 at the default target, and another store reopens it from its files (no rebuild)."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    budget = 600 * DIM * 4 / 2**30  # less than 1500 vectors' float32
    params = IndexParams(exact_max=500, nlist=16, memory_gb=budget, pq_bytes=8)
    store = RetrievalStore(sessions, tmp_path / "index", params, refresh_seconds=0)
    base = clustered(1500, seed=4)
    add_images(store, sessions, mv, ds, base, "a")
    store.rebuild(mv, "image", DIM)
    assert store.index(mv, "image", DIM).kind == "ivfpq"
    noisy = base[np.random.default_rng(8).choice(len(base), 40)] + 0.05 * np.random.default_rng(9).standard_normal(
        (40, DIM))
    queries = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    found = [[h.embedding_id for h in row] for row in store.search(mv, "image", queries, 10)]
    index = store.index(mv, "image", DIM)
    ids = np.sort(index.ids())
    assert index.full is not None
    truth = ids[np.argsort(-(queries @ index.full.get(ids).T), axis=1)[:, :10]]
    np.testing.assert_allclose(index.full.get(ids), base[np.argsort(np.argsort(ids))], atol=1e-6)
    assert recall_at_10(np.array(found), truth) >= 0.95

    fresh = RetrievalStore(sessions, tmp_path / "index", params, refresh_seconds=0)
    no_rebuild(fresh, monkeypatch)
    assert fresh.sync(mv, "image", DIM).action == "loaded"
    assert [[h.embedding_id for h in row] for row in fresh.search(mv, "image", queries, 10)] == found
    engine.dispose()  # type: ignore[attr-defined]


def test_inner_products_read_in_place_match_the_gathered_vectors(tmp_path: Path) -> None:
    """100 seeded trials: ids spread over 1-3 saved segments and the growing file, some added again
    (the newest row wins), some never added or negative; the in-place inner products equal those
    of the gathered vectors, -inf where an id is not held."""
    for trial in range(100):
        rng = np.random.default_rng(trial)
        dim = int(rng.integers(1, 40))
        full = FullVectors(tmp_path / f"t{trial}.faiss", dim)
        latest: dict[int, np.ndarray] = {}
        for _ in range(int(rng.integers(1, 4))):
            for _ in range(int(rng.integers(1, 3))):
                ids = rng.choice(60, size=int(rng.integers(1, 20)), replace=False).astype(np.int64)
                vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
                full.add(ids, vectors)
                latest.update(zip(ids.tolist(), vectors, strict=True))
            if rng.random() < 0.7:
                full.persist()
        asked = rng.integers(-2, 70, size=(int(rng.integers(1, 5)), int(rng.integers(1, 30))))
        queries = rng.standard_normal((len(asked), dim)).astype(np.float32)
        got = full.inner_products(queries, asked)
        for (i, j), v in np.ndenumerate(asked):
            want = float(latest[v] @ queries[i]) if v in latest else -np.inf
            assert got[i, j] == pytest.approx(want, rel=1e-5, abs=1e-5), (trial, i, j, v)

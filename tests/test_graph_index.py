"""The graph kind (HNSW, ``IndexParams(graph=True)``): its search beam is calibrated to the recall
target, filters are exact, removals are tombstones that no search returns and that survive saves,
reopens and kill -9, and a store builds one from SQL, follows deletes and reopens it without a rebuild."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bench.realistic import exact_top, realistic
from index import graph
from index.indexfile import remove_stale_temps
from index.store import RetrievalStore
from index.vectors import IndexParams, VectorIndex, kind_for
from tests.faultkit import kill_9_rounds
from tests.test_compressed_index import vector_of
from tests.test_index_growth import add_images, assert_matches_sql, setup_db, sql_vectors
from tests.test_search_calibration import recall_at_10
from tests.test_search_restart import no_rebuild
from tests.test_vectors import DIM, brute, clustered

N, BIG_DIM = 20_000, 256
GRAPH = IndexParams(exact_max=1000, graph=True)


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    data = realistic(N, num_queries=400, dim=BIG_DIM, seed=3)
    ids = np.arange(N, dtype=np.int64) * 3 + 5
    return data, ids, VectorIndex.build(BIG_DIM, ids, data.base, GRAPH)


def test_graph_is_chosen_only_when_asked_and_below_the_compressed_sizes() -> None:
    assert kind_for(300_000, 1024, IndexParams(graph=True)) == "hnsw"
    assert kind_for(300_000, 1024, IndexParams()) == "ivf"
    assert kind_for(500, 1024, IndexParams(graph=True)) == "flat"
    assert kind_for(6_000_000, 1024, IndexParams(graph=True)) == "ivfpq"


@pytest.mark.parametrize("target", [0.9, 0.95, 0.98])
def test_default_graph_search_reaches_the_recall_target(built, target: float) -> None:  # type: ignore[no-untyped-def]
    """Queries from the shifted distribution (not the calibration's): recall@10 >= the target."""
    data, ids, index = built
    assert index.kind == "hnsw"
    truth = ids[exact_top(data.base, data.queries, 10)[1]]
    ef = index.nprobe(target)
    assert ef <= graph.MAX_EF, "calibration fell back to exact search"
    found = index.search(data.queries, 10, recall=target)[1]
    assert recall_at_10(found, truth) >= target
    # the set is hard enough that the target means something: a quarter of the beam misses it
    assert recall_at_10(index.search(data.queries, 10, nprobe=max(10, ef // 4))[1], truth) < target
    assert recall_at_10(index.search(data.queries, 10, recall=1.0)[1], truth) == 1.0  # exact


@pytest.mark.parametrize("share", [1, 10])
def test_filtered_graph_search_is_exact(built, share: int) -> None:  # type: ignore[no-untyped-def]
    data, ids, index = built
    mask = data.buckets < share
    truth = ids[mask][exact_top(data.base[mask], data.queries, 10)[1]]
    found = index.search(data.queries, 10, allowed=ids[mask])[1]
    assert np.array_equal(found, truth)


def test_random_adds_removes_saves_and_reopens_keep_exactly_the_live_ids(tmp_path: Path) -> None:
    """Injects 20 seeded trials of 6-12 random operations (add a batch, remove some, save, reopen the
    mapped file, re-add a removed id) into a graph. After each: the index holds exactly the live ids
    (an add first copies a mapped graph into memory; a removal leaves it mapped),
    an exact search finds each stored vector as its own top hit, and a graph search of 30 never returns
    a removed id and returns as many hits as there are live vectors (up to 30)."""
    params = IndexParams(exact_max=50, graph=True, follow_size=False)
    checked = 0
    for trial in range(20):
        rng = np.random.default_rng(trial)
        path = tmp_path / f"t{trial}.faiss"
        live = set(range(1, 401))
        index = VectorIndex.build(DIM, np.arange(1, 401), vector_of(np.arange(1, 401)), params)
        next_id = 401
        for _ in range(int(rng.integers(6, 13))):
            op = rng.choice(["add", "remove", "save", "reopen", "readd"])
            if op == "add":
                new = np.arange(next_id, next_id + int(rng.integers(1, 60)), dtype=np.int64)
                next_id += len(new)
                index.add(new, vector_of(new))
                live |= set(new.tolist())
                assert not index.mapped  # copied into memory first: FAISS aborts on an add to a mapped graph
            elif op == "remove" and live:
                gone = rng.choice(sorted(live), size=min(len(live), int(rng.integers(1, 80))), replace=False)
                was_mapped = index.mapped
                assert index.remove(gone) == len(gone)
                assert index.mapped == was_mapped  # tombstones go into the id map, which is not mapped
                live -= set(gone.tolist())
            elif op == "readd" and next_id - 1 > len(live):
                back = np.array([i for i in range(1, next_id) if i not in live][:5], np.int64)
                index.add(back, vector_of(back))
                live |= set(back.tolist())
            elif op in ("save", "reopen"):
                index.save(path)
                if op == "reopen":
                    index = VectorIndex.load(path, params)[0]
                    assert index.mapped
            want = np.array(sorted(live), np.int64)
            assert np.array_equal(np.sort(index.ids()), want) and index.ntotal == len(want)
            if not len(want):
                continue
            probe = rng.choice(want, min(5, len(want)), replace=False)
            assert np.array_equal(index.search(vector_of(probe), 1, recall=1.0)[1][:, 0], probe)
            hits = index.search(vector_of(rng.choice(np.arange(1, next_id), 5)), 30)[1]
            assert np.isin(hits[hits >= 0], want).all(), "a removed id came back"
            assert ((hits >= 0).sum(axis=1) == min(30, len(want))).all()
            checked += 1
    assert checked >= 120


WRITER = """
import sys, numpy as np
from pathlib import Path
from index.vectors import IndexParams, VectorIndex
from tests.faultkit import kill_9_rounds
from tests.test_compressed_index import vector_of
path, start = Path(sys.argv[1]), int(sys.argv[2])
params = IndexParams(exact_max=50, graph=True, follow_size=False)
try:
    index = VectorIndex.load(path, params)[0]
except FileNotFoundError:
    ids = np.arange(1, 301, dtype=np.int64)
    index = VectorIndex.build(32, ids, vector_of(ids), params)
    index.save(path)
print("ready", flush=True)
i = start
while True:
    new = np.arange(i, i + 20, dtype=np.int64)
    index.add(new, vector_of(new))
    index.remove(np.sort(index.ids())[:5])
    index.save(path)
    i += 20
"""


def test_kill_9_during_adds_removes_and_saves_leaves_a_consistent_graph(tmp_path: Path) -> None:
    """Injects kill -9 into a process that adds 20 vectors, tombstones the 5 lowest ids and saves, in
    a loop, 8 times at seeded random moments (each run resumes from the file the last one left).
    After every kill the file loads with its manifest's count, and each live id's stored vector is
    its own exact top hit (so no tombstone was lost or misplaced)."""
    path = tmp_path / "g.faiss"
    sizes = []
    for _ in kill_9_rounds(WRITER, path, rounds=8, seed=7):
        remove_stale_temps(path)
        index, manifest = VectorIndex.load(path)
        ids = np.sort(index.ids())
        assert len(ids) == manifest.count == index.ntotal
        assert np.array_equal(index.search(vector_of(ids), 1, recall=1.0)[1][:, 0], ids)
        sizes.append(graph.dead(index.index))
    assert sizes[-1] > 0  # tombstones were written and survived the kills


def test_store_builds_a_graph_follows_deletes_and_reopens_without_rebuild(
        migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store with ``graph=True`` builds HNSW from SQL; deletes from another store reach it through
    the change log (exact search equals brute force over SQL, the default search keeps recall >= 0.95);
    a third store reopens the saved graph with its tombstones (no rebuild); deletes past a quarter of
    the graph rebuild it without tombstones in the background."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    params = IndexParams(exact_max=500, graph=True)
    store = RetrievalStore(sessions, tmp_path / "index", params, refresh_seconds=0)
    base = clustered(1500, seed=4)
    images = add_images(store, sessions, mv, ds, base, "a")
    store.rebuild(mv, "image", DIM)
    assert store.index(mv, "image", DIM).kind == "hnsw"

    other = RetrievalStore(sessions, tmp_path / "index", params, refresh_seconds=0)
    with sessions() as s:
        other.remove_images(s, images[:200])
    queries = clustered(40, seed=9)
    exact = RetrievalStore(sessions, tmp_path / "index", IndexParams(exact_max=500, graph=True, recall=1.0),
                           refresh_seconds=0)
    assert_matches_sql(exact, sessions, mv, queries)
    store.search(mv, "image", queries[:1])  # catches up with the other store's deletes
    store.wait()
    ids, x = sql_vectors(sessions, mv)
    index = store.index(mv, "image", DIM)
    assert index.kind == "hnsw" and graph.dead(index.index) == 200
    found = np.array([[h.embedding_id for h in row] for row in store.search(mv, "image", queries, 10)])
    assert recall_at_10(found, brute(x, ids, queries, 10)) >= 0.95
    store.save()

    fresh = RetrievalStore(sessions, tmp_path / "index", params, refresh_seconds=0)
    no_rebuild(fresh, monkeypatch)
    assert fresh.sync(mv, "image", DIM).action == "loaded"
    assert graph.dead(fresh.index(mv, "image", DIM).index) == 200
    assert [[h.embedding_id for h in row] for row in fresh.search(mv, "image", queries, 10)] == found.tolist()
    monkeypatch.undo()

    with sessions() as s:  # 200 + 300 of 1500: past a quarter
        fresh.remove_images(s, images[200:500])
    assert fresh.wait(timeout=120)
    rebuilt = fresh.index(mv, "image", DIM)
    assert rebuilt.kind == "hnsw" and graph.dead(rebuilt.index) == 0 and rebuilt.ntotal == 1000
    assert np.array_equal(np.sort(rebuilt.ids()), sql_vectors(sessions, mv)[0])
    engine.dispose()  # type: ignore[attr-defined]


def test_searches_run_between_the_slices_of_a_large_add() -> None:
    """A graph links new vectors slowly (each is searched into the graph), so an add takes the write
    lock one slice at a time: while one thread adds 8 slices, searches from another keep completing.
    Holding the lock for the whole add, as before slicing, completes none of them meanwhile."""
    import threading

    rng = np.random.default_rng(1)
    index = VectorIndex.build(BIG_DIM, np.arange(1, 2001), unit(rng, 2000), IndexParams(exact_max=100, graph=True))
    new = unit(rng, 8 * graph.ADD_SLICE)
    adding, during = threading.Event(), []

    def search() -> None:
        query = unit(rng, 1)
        while not adding.is_set():
            time.sleep(0.001)
        while adding.is_set():
            index.search(query, 10)
            during.append(adding.is_set())

    searcher = threading.Thread(target=search)
    searcher.start()
    adding.set()
    index.add(np.arange(10_001, 10_001 + len(new)), new)
    adding.clear()
    searcher.join()
    assert sum(during) >= 4, f"{sum(during)} searches completed during the add"
    assert index.ntotal == 2000 + len(new)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, BIG_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_setting_reaches_the_store(migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XDLABEL_INDEX_GRAPH=1 in the environment: the services' store builds graphs (default: IVF)."""
    from xdlabel.services import Services
    from xdlabel.settings import Settings

    assert not Services(Settings(data_dir=tmp_path / "a", database_url=migrated_url)).store.params.graph
    monkeypatch.setenv("XDLABEL_INDEX_GRAPH", "1")
    services = Services(Settings(data_dir=tmp_path / "b", database_url=migrated_url))
    assert kind_for(300_000, 1024, services.store.params) == "hnsw"

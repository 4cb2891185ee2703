"""Fast restart and fresh filters, on SQLite and PostgreSQL: the index and its id -> image map are
saved together and reopened without a rebuild or an SQL read of the map; only the change log's
tail is applied; cached filter results follow every change; catch-up runs off the query path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.store import RetrievalStore
from index.vectors import IndexParams
from tests.test_index_growth import add_images, assert_matches_sql, setup_db
from tests.test_vectors import DIM, clustered

PARAMS = IndexParams(exact_max=500, nlist=16)  # IVF from 500 vectors


def no_rebuild(store: RetrievalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a rebuild, or reading the id map from SQL, fail the test."""
    def refuse(*_: object) -> None:
        raise AssertionError("rebuild or SQL id-map read happened")

    monkeypatch.setattr(store, "_build", refuse)
    monkeypatch.setattr(store, "_owners_of", refuse)


def test_reopen_loads_the_saved_index_and_map_without_a_rebuild(migrated_url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine, sessions, mv, ds = setup_db(migrated_url)
    writer = RetrievalStore(sessions, tmp_path / "index", PARAMS, refresh_seconds=0)
    image_ids = add_images(writer, sessions, mv, ds, clustered(1200, seed=1), "a")
    writer.rebuild(mv, "image", DIM)  # IVF, calibrated, saved with its map
    queries = clustered(20, seed=9)
    before = [[(h.embedding_id, h.image_id) for h in row] for row in writer.search(mv, "image", queries, 10)]

    fresh = RetrievalStore(sessions, tmp_path / "index", PARAMS, refresh_seconds=0)
    no_rebuild(fresh, monkeypatch)
    report = fresh.sync(mv, "image", DIM)
    assert report.action == "loaded" and report.count == 1200
    assert fresh.index(mv, "image", DIM).kind == "ivf" and fresh.index(mv, "image", DIM).curve
    # its lists are views of the file (where FAISS can map them), not read into memory
    assert fresh.index(mv, "image", DIM).mapped == hasattr(faiss, "IO_FLAG_MMAP_IFC")
    assert [[(h.embedding_id, h.image_id) for h in row] for row in fresh.search(mv, "image", queries, 10)] == before
    assert {h.image_id for row in fresh.search(mv, "image", queries, 10) for h in row} <= set(image_ids)

    # another process adds 300 and deletes 50 images: a reopen applies only that tail, still no rebuild
    other = RetrievalStore(sessions, tmp_path / "other", PARAMS, refresh_seconds=0)
    add_images(other, sessions, mv, ds, clustered(300, seed=2), "b")
    with sessions() as s:
        other.remove_images(s, image_ids[:50])
    again = RetrievalStore(sessions, tmp_path / "index", PARAMS, refresh_seconds=0)
    no_rebuild(again, monkeypatch)
    report = again.sync(mv, "image", DIM)
    assert (report.action, report.added, report.removed, report.count) == ("updated", 300, 50, 1450)
    index = again.index(mv, "image", DIM)
    assert not index.mapped  # the tail's writes copied the lists into memory first
    owners = again._live[(mv, "image")].owners
    assert np.array_equal(np.sort(index.ids()), owners.ids)  # the map covers exactly the index
    exact = RetrievalStore(sessions, tmp_path / "index", IndexParams(exact_max=500, nlist=16, nprobe=16),
                           refresh_seconds=0)  # every list: compare with brute force over SQL
    assert_matches_sql(exact, sessions, mv, queries)
    engine.dispose()  # type: ignore[attr-defined]


def test_file_without_a_map_still_opens(migrated_url: str, tmp_path: Path) -> None:
    """An index saved by the previous format (no map) opens, reading the map from SQL."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    store = RetrievalStore(sessions, tmp_path / "index", refresh_seconds=0)
    image_ids = add_images(store, sessions, mv, ds, clustered(200, seed=1), "a")
    live = store._live[(mv, "image")]
    live.index.save(store._path(mv, "image"), live.position)  # no map
    fresh = RetrievalStore(sessions, tmp_path / "index", refresh_seconds=0)
    assert fresh.sync(mv, "image", DIM).action == "loaded"
    hit = fresh.search(mv, "image", clustered(200, seed=1)[7:8], 1)[0][0]
    assert hit.image_id == image_ids[7]
    engine.dispose()  # type: ignore[attr-defined]


def test_cached_filters_follow_every_change(migrated_url: str, tmp_path: Path) -> None:
    """60 seeded random steps (add tagged or untagged images, delete some, search a tag filter):
    each filtered search equals brute force over what SQL holds then; a repeated filter with no
    change in between reads no SQL."""
    from sqlalchemy import select

    from index.filters import Filters
    from index.models import Embedding, ImageTag
    from index.repository import add_image
    from index.store import NewEmbedding, from_bytes

    engine, sessions, mv, ds = setup_db(migrated_url)
    store = RetrievalStore(sessions, tmp_path / "index", refresh_seconds=0)
    rng = np.random.default_rng(5)
    q = clustered(3, seed=8)
    alive: list[int] = []
    changed = True
    for step in range(60):
        action = rng.choice(["add", "delete", "search", "search"]) if alive else "add"
        changed = changed or action != "search"
        if action == "add":
            vectors = clustered(int(rng.integers(1, 20)), seed=100 + step)
            with sessions() as s:
                images = [add_image(s, dataset_id=ds, uri=f"file:///{step}-{i}.png", sha256=f"{step:032x}{i:032x}",
                                    tags=["red"] if rng.random() < 0.3 else ["blue"]) for i in range(len(vectors))]
                store.add_embeddings(s, mv, {"image": DIM}, [NewEmbedding(im.id, "image", v)
                                                              for im, v in zip(images, vectors, strict=True)])
                alive += [im.id for im in images]
        elif action == "delete":
            doomed = list(rng.choice(alive, size=min(len(alive), int(rng.integers(1, 5))), replace=False))
            with sessions() as s:
                store.remove_images(s, [int(i) for i in doomed])
            alive = [i for i in alive if i not in doomed]
        else:
            misses = store.allowed.misses
            hits = store.search(mv, "image", q, 5, filters=Filters(tags=["red"]))
            again = store.search(mv, "image", q, 5, filters=Filters(tags=["red"]))
            # SQL is read once after a change, never for a repeat with no change between
            assert again == hits and store.allowed.misses == misses + changed, step
            changed = False
            with sessions() as s:
                rows = s.execute(select(Embedding.image_id, Embedding.vector).join(
                    ImageTag, ImageTag.image_id == Embedding.image_id).where(ImageTag.tag == "red")).all()
            if not rows:
                assert hits == [[], [], []]
                continue
            owners = np.array([r[0] for r in rows])
            x = np.stack([from_bytes(r[1]) for r in rows])
            truth = owners[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]]
            assert [[h.image_id for h in row] for row in hits] == [list(t[:len(row)]) for t, row in
                                                                   zip(truth, hits, strict=True)], step
    engine.dispose()  # type: ignore[attr-defined]


def test_catch_up_runs_off_the_query_path(migrated_url: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the change log is slowed by 1.5 s (injected): searches keep answering from the
    loaded index meanwhile, and the other process's rows become searchable once it is done."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    api = RetrievalStore(sessions, tmp_path / "api", refresh_seconds=0.05)
    add_images(api, sessions, mv, ds, clustered(100, seed=1), "a")
    new = clustered(10, seed=77)
    add_images(RetrievalStore(sessions, tmp_path / "worker", refresh_seconds=0), sessions, mv, ds, new, "b")
    slow = threading.Event()
    original = api._apply_log

    def slow_apply(*args: object) -> tuple[int, int, int]:
        slow.set()
        time.sleep(1.5)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "_apply_log", slow_apply)
    time.sleep(0.1)
    timings = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        start = time.perf_counter()
        hit = api.search(mv, "image", new[:1], 1)[0][0]
        timings.append(time.perf_counter() - start)
        if hit.score > 0.9999:
            break
        time.sleep(0.02)
    assert slow.is_set() and hit.score > 0.9999, "the other process's rows never became searchable"
    assert max(timings) < 0.5 and len(timings) > 10, timings  # none waited for the 1.5 s catch-up
    api.refresh_seconds = None
    assert api.wait(5)
    engine.dispose()  # type: ignore[attr-defined]

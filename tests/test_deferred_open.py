"""A server's restart answers before the change log's tail is applied, on SQLite and PostgreSQL.

A server's store (``defer_open``; it serves other processes' changes a little late anyway) opens
the saved file and answers at once: the tail's deletes are hidden from the first search, and
applying the tail, checking the count against SQL and saving happen in a background thread.
Injected: a catch-up held on a gate until the first searches are done, random tails of adds and
deletes, kill -9 of a server during its catch-up, and a file that disagrees
with SQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from sqlalchemy import delete, select

from index.models import Embedding, EmbeddingChange
from index.store import RetrievalStore
from index.vectors import IndexParams
from tests.test_index_growth import add_images, assert_matches_sql, setup_db, sql_vectors
from tests.test_vectors import DIM, brute, clustered

# IVF from 500 vectors, every list probed: searches are exact, so each answer has one right value
EXACT = IndexParams(exact_max=500, nlist=16, nprobe=16)
TRIALS = 6


def held_catch_up(store: RetrievalStore, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold the store's catch-up at its start until ``gate`` is set; ``entered`` says it began."""
    entered, gate = threading.Event(), threading.Event()
    original = store._catch_up

    def held(key: tuple[int, str]) -> None:
        entered.set()
        assert gate.wait(30), "the test never released the catch-up"
        original(key)

    monkeypatch.setattr(store, "_catch_up", held)
    return entered, gate


def test_first_answer_does_not_wait_for_the_log_tail(migrated_url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """6 seeded trials: another process adds 0-60 images and deletes 0-40 (from the saved file and
    from its own adds) after the save. A new server store answers its first searches while its
    catch-up is held: with the file still mapped, exactly the saved vectors minus the deleted ones,
    k hits each. Released, it holds exactly SQL's vectors and has saved them: the next open has no tail."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    writer = RetrievalStore(sessions, tmp_path / "writer", EXACT, refresh_seconds=0)
    alive = add_images(writer, sessions, mv, ds, clustered(800, seed=1), "base")
    writer.rebuild(mv, "image", DIM)
    (tmp_path / "writer" / f"mv{mv}-image.faiss").rename(tmp_path / "saved.faiss")
    rng = np.random.default_rng(11)
    queries = clustered(8, seed=99)
    for trial in range(TRIALS):
        folder = tmp_path / f"server{trial}"
        folder.mkdir()
        (tmp_path / "saved.faiss").rename(folder / f"mv{mv}-image.faiss")
        saved_ids, saved_x = sql_vectors(sessions, mv)  # what the file holds (no tail yet)
        other = RetrievalStore(sessions, tmp_path / "other", EXACT, refresh_seconds=0)
        alive += add_images(other, sessions, mv, ds, clustered(int(rng.integers(0, 61)), seed=100 + trial),
                            f"tail{trial}")
        doomed = [int(i) for i in rng.choice(alive, size=int(rng.integers(0, 41)), replace=False)]
        with sessions() as s:
            other.remove_images(s, doomed)
        alive = [i for i in alive if i not in doomed]
        with sessions() as s:
            gone = set(s.scalars(select(EmbeddingChange.embedding_id).where(EmbeddingChange.op == "delete")))

        server = RetrievalStore(sessions, folder, EXACT, refresh_seconds=60, defer_open=True)
        entered, gate = held_catch_up(server, monkeypatch)
        hits = server.search(mv, "image", queries, 10)
        assert entered.wait(10), "no catch-up started for the tail"
        assert server.index(mv, "image", DIM).mapped == hasattr(faiss, "IO_FLAG_MMAP_IFC"), trial
        keep = ~np.isin(saved_ids, list(gone))
        truth = brute(saved_x[keep], saved_ids[keep], queries, 10)
        assert np.array_equal(np.array([[h.embedding_id for h in row] for row in hits]), truth), trial
        assert not {h.image_id for row in hits for h in row} & set(doomed), trial

        gate.set()
        assert server.wait(30)
        assert_matches_sql(server, sessions, mv, queries)
        again = RetrievalStore(sessions, folder, EXACT, refresh_seconds=0)
        report = again.sync(mv, "image", DIM)
        assert (report.action, report.added, report.removed) == ("loaded", 0, 0), trial
        monkeypatch.undo()
        (folder / f"mv{mv}-image.faiss").rename(tmp_path / "saved.faiss")  # the next trial starts from it
    engine.dispose()  # type: ignore[attr-defined]


def test_a_file_that_disagrees_with_sql_is_rebuilt_in_the_background(migrated_url: str, tmp_path: Path) -> None:
    """Rows deleted together with their log rows (a database restored from a backup, a log pruned
    by hand): the first search answers from the file, the background check finds the count wrong,
    and a rebuild from SQL is swapped in."""
    engine, sessions, mv, ds = setup_db(migrated_url)
    writer = RetrievalStore(sessions, tmp_path / "index", EXACT, refresh_seconds=0)
    add_images(writer, sessions, mv, ds, clustered(700, seed=3), "a")
    writer.rebuild(mv, "image", DIM)
    with sessions() as s:
        doomed = s.scalars(select(Embedding.id).order_by(Embedding.id).limit(30)).all()
        s.execute(delete(Embedding).where(Embedding.id.in_(doomed)))
        s.execute(delete(EmbeddingChange).where(EmbeddingChange.embedding_id.in_(doomed)))
        s.commit()
    server = RetrievalStore(sessions, tmp_path / "index", EXACT, refresh_seconds=60, defer_open=True)
    first = server.search(mv, "image", clustered(1, seed=3)[:1], 1)[0]
    assert first, "the first search did not answer"
    assert server.wait(60)
    assert server.index(mv, "image", DIM).ntotal == 670
    assert_matches_sql(server, sessions, mv, clustered(8, seed=5))
    engine.dispose()  # type: ignore[attr-defined]


SERVER = """
import os, sys, numpy as np
from pathlib import Path
from index.db import make_engine, make_session_factory
from index.store import RetrievalStore
from index.vectors import IndexParams
url, folder, mv = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
params = IndexParams(exact_max=5_000, nlist=64)  # the parent's
store = RetrievalStore(make_session_factory(make_engine(url)), folder, params, defer_open=True)  # a server's
store._build = lambda *_: os._exit(3)  # the saved file must be used, never rebuilt from SQL
store.search(mv, "image", np.ones((1, 256), np.float32), 10)
print("answered", flush=True)
store.wait()
print("caught up", flush=True)
"""


def test_kill_during_the_background_catch_up(tmp_path: Path) -> None:
    """8 seeded trials: another writer adds 4000 rows and deletes 400; a server process answers its
    first search, then gets SIGKILL during or after its background catch-up (which copies the mapped
    lists, applies the tail, counts and saves): after a random 0-0.6 or 1.4-2.5 times the catch-up's
    length measured by a run not killed. The next open matches SQL exactly and leaves no temp file,
    and kills landed both before the catch-up's save and after it."""
    import os
    import signal
    import subprocess
    import sys

    from sqlalchemy import func, insert

    from index.db import make_engine, make_session_factory, upgrade
    from index.models import Image
    from index.repository import create_dataset, get_or_create_model_version
    from index.store import to_bytes

    url = f"sqlite:///{tmp_path / 'k.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    rng = np.random.default_rng(21)

    def write(n: int, deletes: int) -> None:
        x = rng.standard_normal((n, 256)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        with sessions() as s:
            first = int(s.scalar(select(func.coalesce(func.max(Image.id), 0)))) + 1
            s.execute(insert(Image), [{"id": first + i, "dataset_id": ds, "uri": f"file:///{first + i}",
                                       "sha256": f"{first + i:064x}", "meta": {}, "status": "done"} for i in range(n)])
            s.execute(insert(Embedding), [{"model_version_id": mv, "image_id": first + i, "kind": "image",
                                           "vector": to_bytes(x[i])} for i in range(n)])
            doomed = [int(i) for i in rng.choice(first - 1, deletes, replace=False) + 1] if deletes else []
            s.execute(delete(Embedding).where(Embedding.image_id.in_(doomed)))
            s.execute(delete(Image).where(Image.id.in_(doomed)))
            s.commit()

    with sessions() as s:
        mv = get_or_create_model_version(s, name="k", checkpoint_sha256="0" * 64, embedding_dim=256).id
        ds = create_dataset(s, name="k").id
        s.commit()
    write(20_000, 0)
    folder = tmp_path / "index"
    params = IndexParams(exact_max=5_000, nlist=64)
    RetrievalStore(sessions, folder, params, refresh_seconds=0).rebuild(mv, "image", 256)  # IVF, mapped on open
    path = folder / f"mv{mv}-image.faiss"

    def serve() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, url, str(folder), str(mv)],
                                cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "answered"
        return proc

    write(4_000, 400)
    proc = serve()
    began = time.perf_counter()
    assert proc.stdout is not None and proc.stdout.readline().strip() == "caught up"
    length = time.perf_counter() - began
    assert proc.wait(30) == 0
    before_save = after_save = 0
    for trial in range(8):
        write(4_000, 400)
        saved = path.stat().st_mtime_ns
        proc = serve()
        time.sleep(length * float(rng.uniform(0, 0.6) if trial % 2 else rng.uniform(1.4, 2.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if path.stat().st_mtime_ns == saved:
            before_save += 1
        else:
            after_save += 1
        store = RetrievalStore(sessions, folder, params, refresh_seconds=0)
        assert not any(p.name.endswith(".tmp") for p in folder.iterdir()), trial
        ids, x = sql_vectors(sessions, mv)
        assert np.array_equal(np.sort(store.index(mv, "image", 256).ids()), ids), trial
        probe = x[int(rng.integers(len(x)))]
        assert store.search(mv, "image", probe[None], 1)[0][0].score == pytest.approx(1.0, abs=1e-5), trial
        store.save()  # each trial's tail is new
    print(f"kill -9 of a catching-up server ({length:.2f} s): {before_save} of 8 before its save, {after_save} after")
    assert before_save and after_save, (before_save, after_save)
    engine.dispose()

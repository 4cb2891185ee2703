"""xdlabel's store paths of the peer table: RetrievalStore over SQLite and over PostgreSQL. Each
database gets the realistic set as image rows (one dataset per bucket, so the 1 % and 10 % filters
are dataset filters on an indexed column). Rows: the first answer of a fresh store (no saved index:
built from SQL, calibrated, saved), default searches (recall target 0.95, no hand-set parameter),
both filters (cold = the first call, which reads the allowed ids from SQL; then cached per filter),
and the first answer of a second store opening the saved index + id map (a restart), for the default
IVF and for the graph kind (``graph=True``). PostgreSQL runs in a database created for the run and
dropped after it; without a server the rows are skipped with a message.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
POSTGRES_ADMIN_URL = os.environ.get("XDLABEL_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh database for this run (None without a server), dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"xdlabel_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # noqa: BLE001 - any connection failure means no server
        print(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({err}): no PostgreSQL rows", flush=True)
        admin.dispose()
        yield None
        return
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def rows(x: np.ndarray, queries: np.ndarray, buckets: np.ndarray, truths: dict[int, np.ndarray]) -> list[Row]:
    """``truths``: exact top-10 image ids per query, unfiltered (0) and per filter share (1, 10)."""
    out: list[Row] = []
    for graph in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            out += store_rows("SQLite", f"sqlite:///{tmp}/bench.db", Path(tmp), x, queries, buckets, truths, graph)
        with postgres_database() as url, tempfile.TemporaryDirectory() as tmp:
            if url is not None:
                out += store_rows("PostgreSQL", url, Path(tmp), x, queries, buckets, truths, graph)
    return out


def store_rows(label: str, url: str, tmp: Path, x: np.ndarray, queries: np.ndarray, buckets: np.ndarray,
               truths: dict[int, np.ndarray], graph: bool = False) -> list[Row]:
    from sqlalchemy import select

    from bench.search import populate_sql
    from bench.search_realistic import row, timed
    from index.db import make_engine, make_session_factory
    from index.filters import Filters
    from index.models import Dataset
    from index.store import RetrievalStore
    from index.vectors import IndexParams

    out: list[Row] = []
    n, dim = x.shape
    start = time.perf_counter()
    mv, _ = populate_sql(url, x, dim, buckets=buckets)
    load = time.perf_counter() - start
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        dataset_of = {name: int(i) for i, name in session.execute(select(Dataset.id, Dataset.name)).all()}
    folder = tmp / "index"
    path = folder / f"mv{mv}-image.faiss"

    def add(path_label: str, build: float, result: Row, note: str = "") -> None:
        mem = path.stat().st_size / 2**20 if path.exists() else float("nan")
        kind = " graph=True" if graph else ""
        out.append(row(n, f"xdlabel store {label}{kind}: {path_label}", build, mem, result, note))

    def first_answer(store: RetrievalStore) -> float:
        start = time.perf_counter()
        store.search(mv, "image", queries[:1], 10)
        return time.perf_counter() - start

    def image_ids(store: RetrievalStore, q: np.ndarray, filters: Filters | None = None) -> np.ndarray:
        hits = store.search(mv, "image", q, 10, filters=filters)
        return np.array([[h.image_id for h in found] + [-1] * (10 - len(found)) for found in hits])

    nothing: Row = {"p50_ms": float("nan"), "p99_ms": float("nan"), "qps": float("nan"), "recall": float("nan")}
    params = IndexParams(graph=graph)
    store = RetrievalStore(sessions, folder, params)
    built = first_answer(store)
    kind = store.index(mv, "image", dim).kind
    add("no saved index: built from SQL", built, nothing,
        f"first answer {built:.1f}s incl. calibration and save ({kind}); SQL load {load:.0f}s")
    add("default (recall target 0.95)", float("nan"), timed(lambda q: image_ids(store, q), queries, truths[0]))
    for share in (1, 10):
        filters = Filters(dataset_ids=[dataset_of[f"bench-{b}"] for b in range(share)])
        start = time.perf_counter()
        image_ids(store, queries[:1], filters)
        cold = time.perf_counter() - start
        add(f"filter {share}%", float("nan"), timed(lambda q, f=filters: image_ids(store, q, f), queries,
                                                    truths[share]),
            f"first call (allowed ids from SQL) {cold * 1e3:.0f} ms, then cached")
    mtime = path.stat().st_mtime_ns
    restarted = RetrievalStore(sessions, folder, params)
    first = first_answer(restarted)
    # a restart must load the file, not rebuild it: a rebuild would save it again
    reused = path.stat().st_mtime_ns == mtime and restarted.index(mv, "image", dim).ntotal == n
    add("restart: saved index + id map", first, nothing,
        f"first answer {first:.2f}s, {'loaded, no rebuild' if reused else 'REBUILT'}")
    engine.dispose()
    return out

"""Restart to first answer at scale: a store over N saved vectors, reopened by a new process.

For each database (SQLite; PostgreSQL when reachable, in a database created for the run): N
realistic vectors (``bench.realistic``) as image rows, and the index a running store leaves behind:
built from the same vectors, calibrated, saved with its id map at the change log's end. (It is
trained on ``--train`` vectors instead of 64 per list to keep the run short; what a restart costs
does not depend on the training.) Then, alternating, ``--runs`` new processes for each way to open:

* ``mapped``: xdlabel's open; FAISS maps the inverted lists from the file (``index.indexfile``).
* ``read whole``: the same file read into memory (the un-optimised path, ``map_lists=False``).

Each child times its imports, the store's open (which must report ``loaded``: no rebuild) and the
first search (one query vector, the default recall target), and reports its resident memory; the
parent times spawn to answer. The file is in the page cache (just written): a cold start also
waits for the disk to read the lists a query probes (a few % of the file), or all of it when read whole.

    python bench/restart.py --n 1000000 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("mapped", "read whole")


def child(url: str, folder: str, mv: int, dim: int, mode: str, queries: str) -> None:
    start = time.perf_counter()
    import functools

    from index import indexfile
    from index.db import make_engine, make_session_factory
    from index.store import RetrievalStore

    if mode == "read whole":
        indexfile.read = functools.partial(indexfile.read, map_lists=False)  # type: ignore[assignment]
    imported = time.perf_counter()
    store = RetrievalStore(make_session_factory(make_engine(url)), Path(folder))
    report = store.sync(mv, "image", dim)
    opened = time.perf_counter()
    hits = store.search(mv, "image", np.load(queries)[:1], 10)[0]
    answered = time.perf_counter()
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024
    print(json.dumps({"action": report.action, "count": report.count, "mapped": store.index(mv, "image", dim).mapped,
                      "import_s": imported - start, "open_s": opened - imported, "search_s": answered - opened,
                      "rss_mb": rss, "top": [h.image_id for h in hits]}), flush=True)


def restarts(url: str, folder: Path, mv: int, dim: int, queries: Path, runs: int) -> list[dict[str, Any]]:
    path = folder / f"mv{mv}-image.faiss"
    mtime = path.stat().st_mtime_ns
    out = []
    for run in range(runs):
        for mode in MODES:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "bench.restart", "--child", url, str(folder), str(mv),
                                   str(dim), mode, str(queries)], cwd=REPO, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["action"] != "loaded" or path.stat().st_mtime_ns != mtime:
                raise RuntimeError(f"{mode}: the saved index was not reused ({result['action']})")
            if result["mapped"] != (mode == "mapped"):
                raise RuntimeError(f"{mode}: the index was {'' if result['mapped'] else 'not '}mapped")
            out.append({**result, "mode": mode, "run": run, "wall_s": wall})
            print(f"  {mode:10s} run {run}: spawn->answer {wall:.2f}s, open {result['open_s']:.3f}s, "
                  f"first search {result['search_s'] * 1e3:.1f}ms, RSS {result['rss_mb']} MB", flush=True)
    tops = {json.dumps(r["top"]) for r in out}
    if len(tops) != 1:
        raise RuntimeError(f"the ways to open disagree on the first answer: {tops}")
    return out


def prepare(url: str, folder: Path, data: Any, train: int) -> int:
    """Image rows for ``data.base`` and the saved index a running store would leave; the model version id."""
    from sqlalchemy import func, select

    from bench.search import populate_sql
    from index.db import make_engine, make_session_factory
    from index.models import EmbeddingChange
    from index.owners import Owners
    from index.records import save_with_owners
    from index.vectors import IndexParams, VectorIndex

    n, dim = data.base.shape
    start = time.perf_counter()
    mv, _ = populate_sql(url, data.base, dim)
    print(f"  {n} rows into SQL in {time.perf_counter() - start:.0f}s", flush=True)
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        position = int(session.scalar(select(func.coalesce(func.max(EmbeddingChange.seq), 0))) or 0)
    engine.dispose()
    ids = np.arange(1, n + 1, dtype=np.int64)
    start = time.perf_counter()
    index = VectorIndex.build(dim, ids, data.base, IndexParams(train_sample=train))
    save_with_owners(index, Owners(ids, ids), folder / f"mv{mv}-image.faiss", position)
    print(f"  {index.kind} index built, calibrated and saved in {time.perf_counter() - start:.0f}s", flush=True)
    return mv


def main() -> None:
    from bench.realistic import realistic
    from bench.search_store import postgres_database

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train", type=int, default=40_000)
    args = parser.parse_args()
    data = realistic(args.n, num_queries=10, dim=args.dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        queries = tmp / "queries.npy"
        np.save(queries, data.queries)
        print(f"SQLite, {args.n} x {args.dim}", flush=True)
        folder = tmp / "sqlite"
        url = f"sqlite:///{tmp}/bench.db"
        mv = prepare(url, folder, data, args.train)
        rows += [{"database": "SQLite", **r} for r in restarts(url, folder, mv, args.dim, queries, args.runs)]
        (tmp / "bench.db").unlink()
        with postgres_database() as pg:
            if pg is not None:
                print(f"PostgreSQL, {args.n} x {args.dim}", flush=True)
                folder = tmp / "postgresql"
                mv = prepare(pg, folder, data, args.train)
                found = restarts(pg, folder, mv, args.dim, queries, args.runs)
                rows += [{"database": "PostgreSQL", **r} for r in found]
        size = sum(p.stat().st_size for p in tmp.rglob("*.faiss")) / max(1, len(list(tmp.rglob("*.faiss"))))
    print_table(rows, args.n, args.dim, size)


def print_table(rows: list[dict[str, Any]], n: int, dim: int, size: float) -> None:
    print(f"\nRestart to first answer, {n:,} x {dim} saved vectors ({size / 2**30:.1f} GiB file, in the page cache); "
          f"median of {max(r['run'] for r in rows) + 1} new processes each\n")
    print("| database | open | spawn -> first answer | imports | store open | first search | RSS after |")
    print("|---|---|---|---|---|---|---|")
    for database in dict.fromkeys(r["database"] for r in rows):
        for mode in MODES:
            mine = [r for r in rows if r["database"] == database and r["mode"] == mode]
            med = {key: float(np.median([r[key] for r in mine])) for key in
                   ("wall_s", "import_s", "open_s", "search_s", "rss_mb")}
            print(f"| {database} | {mode} | {med['wall_s']:.2f} s | {med['import_s']:.2f} s | {med['open_s']:.2f} s | "
                  f"{med['search_s'] * 1e3:.0f} ms | {med['rss_mb'] / 1024:.1f} GiB |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # bench.* when run as a script
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
    else:
        main()

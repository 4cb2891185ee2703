"""Restart to first answer at scale: a store over N saved vectors, reopened by a new process.

For each database (SQLite; PostgreSQL when reachable, in a database created for the run): N
realistic vectors (``bench.realistic``) as image rows, and the index a running store leaves behind:
built from the same vectors, calibrated, saved with its id map at the change log's end. (It is
trained on ``--train`` vectors instead of 64 per list to keep the run short; what a restart costs
does not depend on the training.) Then, alternating, ``--runs`` new processes for each way to open:

* ``mapped``: a server's store (xdlabel's default): FAISS maps the inverted lists from the file
  (``index.indexfile``); its first search opens the index.
* ``read whole``: the same, with the file read into memory (the un-optimised path, ``map_lists=False``).
* ``mapped + tail``: before the start, another writer adds ``--tail`` rows and deletes a tenth as
  many; the server answers at once and applies that tail in a background thread (searching meanwhile).
* ``tail first``: the same tail applied before the first answer (``store.sync``, the un-optimised path).

Each child times its imports, its first answer (which must come from the saved file: a rebuild
fails the run) and, with a tail, the time until it is caught up and the slowest search meanwhile;
it reports its resident memory at the end. The parent times spawn to answer. The file is in the
page cache (just written): a cold start also waits for the disk to read the lists a query probes (a
few % of the file), or all of it when read whole.

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
MODES = ("mapped", "read whole", "mapped + tail", "tail first")


def child(url: str, folder: str, mv: int, dim: int, mode: str, queries: str) -> None:
    start = time.perf_counter()
    import functools

    from index import indexfile
    from index.db import make_engine, make_session_factory
    from index.store import RetrievalStore

    if mode == "read whole":
        indexfile.read = functools.partial(indexfile.read, map_lists=False)  # type: ignore[assignment]
    imported = time.perf_counter()
    store = RetrievalStore(make_session_factory(make_engine(url)), Path(folder), defer_open=True)  # a server's

    def refuse(*_: object) -> None:
        raise RuntimeError("rebuilt from SQL")

    store._build = refuse  # type: ignore[method-assign,assignment]
    query = np.load(queries)[:1]
    if mode == "tail first":
        store.sync(mv, "image", dim)
    hits = store.search(mv, "image", query, 10)[0]
    answered, answered_at = time.perf_counter(), time.time()
    mapped = store.index(mv, "image", dim).mapped
    slowest = 0.0
    while not store.wait(0):  # the tail's catch-up: searches go on meanwhile
        began = time.perf_counter()
        store.search(mv, "image", query, 10)
        slowest = max(slowest, time.perf_counter() - began)
    caught_up = time.perf_counter()
    live = store._live[(mv, "image")]
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024
    print(json.dumps({"count": live.index.ntotal, "verified": live.verified, "mapped": mapped,
                      "import_s": imported - start, "answer_s": answered - imported, "answered_at": answered_at,
                      "caught_up_s": caught_up - answered, "slowest_s": slowest, "rss_mb": rss,
                      "top": [h.image_id for h in hits]}), flush=True)


def add_tail(url: str, mv: int, vectors: np.ndarray, deletes: int, seed: int) -> None:
    """Another writer: ``vectors`` as new images, and ``deletes`` random earlier images deleted."""
    from sqlalchemy import delete, func, insert, select

    from index.db import make_engine, make_session_factory
    from index.models import Embedding, Image
    from index.store import to_bytes

    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        first = int(session.scalar(select(func.max(Image.id))) or 0) + 1
        dataset = session.scalar(select(Image.dataset_id).limit(1))
        ids = range(first, first + len(vectors))
        session.execute(insert(Image), [{"id": i, "dataset_id": dataset, "uri": f"file:///tail/{i}.jpg",
                                         "sha256": f"{i:064x}", "meta": {}, "status": "done"} for i in ids])
        session.execute(insert(Embedding), [{"id": i, "model_version_id": mv, "image_id": i, "kind": "image",
                                             "vector": to_bytes(v)} for i, v in zip(ids, vectors, strict=True)])
        doomed = np.random.default_rng(seed).choice(first - 1, deletes, replace=False) + 1
        session.execute(delete(Embedding).where(Embedding.image_id.in_(doomed.tolist())))
        session.execute(delete(Image).where(Image.id.in_(doomed.tolist())))
        session.commit()
    engine.dispose()


def restarts(url: str, folder: Path, mv: int, dim: int, queries: Path, runs: int, tail: np.ndarray
             ) -> list[dict[str, Any]]:
    path = folder / f"mv{mv}-image.faiss"
    out = []
    for run in range(runs):
        for mode in MODES:
            mtime = path.stat().st_mtime_ns
            if "tail" in mode:
                add_tail(url, mv, tail[run * 2 + (mode == "tail first")], len(tail[0]) // 10, seed=len(out))
            spawned = time.time()
            done = subprocess.run([sys.executable, "-m", "bench.restart", "--child", url, str(folder), str(mv),
                                   str(dim), mode, str(queries)], cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{mode}: {done.stderr.strip().splitlines()[-1]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if not result["verified"] or ("tail" not in mode and path.stat().st_mtime_ns != mtime):
                raise RuntimeError(f"{mode}: the saved index was not reused as it was")
            if result["mapped"] != (mode == "mapped" or mode == "mapped + tail"):
                raise RuntimeError(f"{mode}: the index was {'' if result['mapped'] else 'not '}mapped")
            out.append({**result, "mode": mode, "run": run, "wall_s": result["answered_at"] - spawned})
            print(f"  {mode:13s} run {run}: spawn->answer {out[-1]['wall_s']:.2f}s, imports {result['import_s']:.2f}s, "
                  f"open+search {result['answer_s']:.3f}s, caught up {result['caught_up_s']:.2f}s later "
                  f"(slowest search meanwhile {result['slowest_s'] * 1e3:.0f}ms), RSS {result['rss_mb']} MB",
                  flush=True)
    tops = {json.dumps(r["top"]) for r in out if "tail" not in r["mode"]}
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
    parser.add_argument("--tail", type=int, default=10_000, help="rows another writer adds before a tail run")
    args = parser.parse_args()
    data = realistic(args.n, num_queries=10, dim=args.dim)
    # the tails: stored vectors moved a little, so they look like the rest of the corpus
    rng = np.random.default_rng(1)
    tail = data.base[rng.integers(0, args.n, (args.runs * 2, args.tail))]
    tail += rng.standard_normal(tail.shape, dtype=np.float32) * 0.01
    tail /= np.linalg.norm(tail, axis=2, keepdims=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        queries = tmp / "queries.npy"
        np.save(queries, data.queries)
        print(f"SQLite, {args.n} x {args.dim}", flush=True)
        folder = tmp / "sqlite"
        url = f"sqlite:///{tmp}/bench.db"
        mv = prepare(url, folder, data, args.train)
        rows += [{"database": "SQLite", **r} for r in restarts(url, folder, mv, args.dim, queries, args.runs, tail)]
        (tmp / "bench.db").unlink()
        with postgres_database() as pg:
            if pg is not None:
                print(f"PostgreSQL, {args.n} x {args.dim}", flush=True)
                folder = tmp / "postgresql"
                mv = prepare(pg, folder, data, args.train)
                found = restarts(pg, folder, mv, args.dim, queries, args.runs, tail)
                rows += [{"database": "PostgreSQL", **r} for r in found]
        size = sum(p.stat().st_size for p in tmp.rglob("*.faiss")) / max(1, len(list(tmp.rglob("*.faiss"))))
    print_table(rows, args.n, args.dim, size, args.tail)


def print_table(rows: list[dict[str, Any]], n: int, dim: int, size: float, tail: int) -> None:
    print(f"\nRestart to first answer, {n:,} x {dim} saved vectors ({size / 2**30:.1f} GiB file, in the page cache); "
          f"tail: {tail:,} rows added and {tail // 10:,} deleted by another writer; "
          f"median of {max(r['run'] for r in rows) + 1} new processes each\n")
    print("| database | open | spawn -> first answer | imports | open + first search | caught up after "
          "| slowest search meanwhile | RSS at the end |")
    print("|---|---|---|---|---|---|---|---|")
    for database in dict.fromkeys(r["database"] for r in rows):
        for mode in MODES:
            mine = [r for r in rows if r["database"] == database and r["mode"] == mode]
            med = {key: float(np.median([r[key] for r in mine])) for key in
                   ("wall_s", "import_s", "answer_s", "caught_up_s", "slowest_s", "rss_mb")}
            print(f"| {database} | {mode} | {med['wall_s']:.2f} s | {med['import_s']:.2f} s | "
                  f"{med['answer_s']:.2f} s | {med['caught_up_s']:.1f} s | {med['slowest_s'] * 1e3:.0f} ms | "
                  f"{med['rss_mb'] / 1024:.1f} GiB |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # bench.* when run as a script
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
    else:
        main()

"""Vector search benchmarks: the realistic peer table, HTTP throughput, and the easy set.

Default: the peer table on bench/realistic.py's workload-shaped set (--n, bench/search_realistic.py)
and HTTP throughput at 16 and 64 clients (--load-n, bench/search_load.py).

--sizes: the easy set, clustered synthetic 512-d unit vectors (seeded) and held-out queries from
the same clusters:
* exact ground truth (FAISS flat inner product);
* raw FAISS: the IVF index xdlabel would build (same nlist), nprobe chosen for recall@10 >= 0.95;
* xdlabel VectorIndex (the same index behind xdlabel's wrapper: lock, selector, params per call);
* xdlabel service path: RetrievalStore.search, i.e. the index plus SQL (SQLite) hydration of hits;
* xdlabel HTTP path: POST /v1/search/text on a real server (includes encoding the query text with
  a small random-weight text encoder, so its latency is an upper bound for the HTTP layer);
* hnswlib HNSW (M=16, ef tuned to the same recall), the peer library users pick instead (optional:
  pip install xdlabel[bench]; the row is skipped without it).
Reported: build time, index memory, p50/p99 single-query latency, batched QPS, recall@10.

Growth (--growth N): vectors arrive the way ingestion writes them (RetrievalStore.add_embeddings,
one batch at a time) until N, past exact_max. Two stores follow the same SQLite database: one as
shipped, which switches flat -> IVF (and retrains IVF at 4x its training size) in the background,
and one with follow_size=False, the old behaviour, which stays flat. Per-query latency and
recall@10 of both, before and after, and the searches made while the background build ran.
Not a test; prints tables.

    python bench/search.py [--n 250000] [--load-n 50000] [--sizes 100000 1000000] [--growth 100000]
    python bench/search.py --n 0 --load-n 0 --growth 60000      # the growth run only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

DIM = 512


def clustered(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (1.2 / np.sqrt(DIM))  # |noise| ~ 1.2 x |center|
    x = centers[rng.integers(0, len(centers), n)] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)]))


def latencies(fn: Callable[[np.ndarray], object], queries: np.ndarray, n: int = 300) -> tuple[float, float]:
    times = []
    for q in queries[:n]:
        start = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def qps(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    start = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - start)


def populate_sql(url: str, ids_vectors: np.ndarray, dim: int = DIM, model_version_id: int | None = None,
                 buckets: np.ndarray | None = None) -> tuple[int, list[int]]:
    """One image per vector (image and embedding id = row + 1), the vectors as embeddings rows (bulk
    insert); one dataset, or with ``buckets`` one dataset per bucket value (named bench-<bucket>), so a
    dataset filter selects a bucket's share of the rows through an indexed column."""
    from sqlalchemy import insert

    from index.db import make_engine, make_session_factory, upgrade
    from index.models import Embedding, Image
    from index.repository import create_dataset, get_or_create_model_version
    from index.store import to_bytes

    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        mv_id = model_version_id or get_or_create_model_version(session, name="bench", checkpoint_sha256="0" * 64,
                                                                embedding_dim=dim).id
        n = len(ids_vectors)
        groups = np.zeros(n, np.int64) if buckets is None else np.asarray(buckets, np.int64)
        datasets = {int(b): create_dataset(session, name=f"bench-{b}").id for b in range(int(groups.max()) + 1)}
        session.commit()
        for start in range(0, n, 50_000):
            stop = min(n, start + 50_000)
            session.execute(insert(Image), [{"id": i + 1, "dataset_id": datasets[int(groups[i])],
                                             "uri": f"file:///{i}.jpg", "sha256": f"{i:064x}", "meta": {},
                                             "status": "done"}
                                            for i in range(start, stop)])
            session.execute(insert(Embedding), [{"id": i + 1, "model_version_id": mv_id, "image_id": i + 1,
                                                 "kind": "image", "vector": to_bytes(ids_vectors[i])}
                                                for i in range(start, stop)])
            session.commit()
    engine.dispose()
    return mv_id, list(range(1, n + 1))


def run_size(n: int, num_queries: int, rows: list[dict[str, object]]) -> None:
    from index.vectors import IndexParams, VectorIndex, train_size

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(100, n // 200), DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = clustered(n, 1, centers)
    queries = clustered(num_queries, 2, centers)
    ids = np.arange(1, n + 1, dtype=np.int64)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    _, truth_pos = exact.search(queries, 10)
    truth = truth_pos + 1
    params = IndexParams()
    nlist = max(16, int(4 * np.sqrt(n)))

    # raw FAISS flat: exact, the baseline of the exact/IVF crossover
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    start = time.perf_counter()
    flat.add_with_ids(x, ids)
    flat_build = time.perf_counter() - start

    def flat_search(q: np.ndarray) -> np.ndarray:
        return flat.search(q, 10)[1]

    rows.append({"n": n, "path": "raw FAISS flat (exact)", "build_s": flat_build, "mem_mb": x.nbytes / 2**20,
                 **dict(zip(("p50_ms", "p99_ms"), latencies(flat_search, queries), strict=True)),
                 "qps": qps(flat_search, queries), "recall": recall_at_10(flat_search(queries), truth)})

    # raw FAISS: the same IVF xdlabel builds
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(DIM)
    raw = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    raw.train(x[np.random.default_rng(0).choice(n, size=train_size(n, params), replace=False)])
    raw.add_with_ids(x, ids)
    raw_build = time.perf_counter() - start
    nprobe = 4
    while True:
        raw.nprobe = nprobe
        if recall_at_10(raw.search(queries, 10)[1], truth) >= 0.95 or nprobe >= nlist:
            break
        nprobe *= 2
    raw.nprobe = nprobe
    memory = len(faiss.serialize_index(raw)) / 2**20

    def raw_search(q: np.ndarray) -> np.ndarray:
        return raw.search(q, 10)[1]

    rows.append({"n": n, "path": f"raw FAISS IVF{nlist} nprobe={nprobe}", "build_s": raw_build, "mem_mb": memory,
                 **dict(zip(("p50_ms", "p99_ms"), latencies(raw_search, queries), strict=True)),
                 "qps": qps(raw_search, queries), "recall": recall_at_10(raw_search(queries), truth)})

    # xdlabel's VectorIndex
    start = time.perf_counter()
    index = VectorIndex.build(DIM, ids, x, IndexParams(nprobe=nprobe))
    build = time.perf_counter() - start

    def wrapped(q: np.ndarray) -> np.ndarray:
        return index.search(q, 10)[1]

    index_memory = len(faiss.serialize_index(index.index)) / 2**20
    rows.append({"n": n, "path": f"xdlabel VectorIndex ({index.kind})", "build_s": build, "mem_mb": index_memory,
                 **dict(zip(("p50_ms", "p99_ms"), latencies(wrapped, queries), strict=True)),
                 "qps": qps(wrapped, queries), "recall": recall_at_10(wrapped(queries), truth)})

    # xdlabel service path: SQL-backed store (SQLite), index rebuilt from SQL
    from index.db import make_engine, make_session_factory
    from index.store import RetrievalStore

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        start = time.perf_counter()
        mv_id, _ = populate_sql(url, x)
        sql_load = time.perf_counter() - start
        engine = make_engine(url)
        store = RetrievalStore(make_session_factory(engine), Path(tmp) / "index",
                               IndexParams(nprobe=nprobe))
        start = time.perf_counter()
        store.index(mv_id, "image", DIM)
        rebuild = time.perf_counter() - start

        def service(q: np.ndarray) -> list[list[int]]:
            return [[h.image_id for h in hits] for hits in store.search(mv_id, "image", q, 10)]

        found = np.array(service(queries))
        rows.append({"n": n, "path": "xdlabel service (index + SQL)", "build_s": rebuild, "mem_mb": index_memory,
                     **dict(zip(("p50_ms", "p99_ms"), latencies(service, queries), strict=True)),
                     "qps": qps(service, queries), "recall": recall_at_10(found, truth),
                     "note": f"SQL load {sql_load:.0f}s"})
        rows.append(http_row(n, url, tmp, nprobe, params, queries[:200]))
        engine.dispose()

    # peer: hnswlib
    try:
        import hnswlib
    except ImportError:
        print("hnswlib not installed (pip install 'xdlabel[bench]'): no HNSW row", flush=True)
        return

    start = time.perf_counter()
    peer = hnswlib.Index(space="ip", dim=DIM)
    peer.init_index(max_elements=n, ef_construction=100, M=16)
    peer.add_items(x, ids)
    peer_build = time.perf_counter() - start
    ef = 16
    while True:
        peer.set_ef(ef)
        if recall_at_10(peer.knn_query(queries, k=10)[0], truth) >= 0.95 or ef >= 1024:
            break
        ef *= 2

    def hnsw(q: np.ndarray) -> np.ndarray:
        return peer.knn_query(q, k=10)[0]

    rows.append({"n": n, "path": f"hnswlib HNSW M=16 ef={ef}", "build_s": peer_build,
                 "mem_mb": n * (DIM * 4 + 16 * 2 * 4 + 8) / 2**20,
                 **dict(zip(("p50_ms", "p99_ms"), latencies(hnsw, queries), strict=True)),
                 "qps": qps(hnsw, queries), "recall": recall_at_10(hnsw(queries), truth)})


def http_row(n: int, url: str, tmp: str, nprobe: int, params: object, queries: np.ndarray) -> dict[str, object]:
    """The API over the same store; the query text is encoded by a small random-weight model whose
    image space is 512-d (dim_proj 256, x2 for the retrieval ensemble)."""
    import dataclasses

    import httpx
    from safetensors.torch import save_file

    from xdecoder import build_model, official_state_dict
    from xdecoder.config import CONFIGS
    from xdlabel.api.auth import create_api_key
    from xdlabel.api.inthread import ThreadedServer
    from xdlabel.services import ModelInfo, Services
    from xdlabel.settings import Settings

    parity = CONFIGS["parity"]
    cfg = dataclasses.replace(parity, dim_proj=256, text=dataclasses.replace(parity.text, width=256))
    model = build_model(cfg)
    weights = Path(tmp) / "bench.safetensors"
    save_file({k: v.contiguous() for k, v in official_state_dict(model).items()}, str(weights))
    services = Services(Settings(data_dir=Path(tmp), database_url=url))
    from xdecoder import Predictor

    services.__dict__["predictor"] = Predictor(model, device="cpu")
    services.__dict__["model"] = ModelInfo(1, "bench", DIM, 256)
    services.store.params = dataclasses.replace(services.store.params, nprobe=nprobe)
    with services.sessions() as session:
        key = create_api_key(session, "bench")
    times = []
    with ThreadedServer(services) as base:
        client = httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=600)
        start = time.perf_counter()
        client.post("/v1/search/text", json={"query": "warm up", "k": 10})  # loads the index
        print(f"HTTP first request (index load) {time.perf_counter() - start:.1f}s", flush=True)
        for i in range(len(queries)):
            start = time.perf_counter()
            r = client.post("/v1/search/text", json={"query": f"a photo of thing {i}", "k": 10})
            times.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
    return {"n": n, "path": "xdlabel HTTP (incl. text encoding)", "build_s": float("nan"), "mem_mb": float("nan"),
            "p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3),
            "qps": 1 / float(np.mean(times)), "recall": float("nan"), "note": "sequential requests"}


def run_growth(target: int, exact_max: int, num_queries: int, batch: int = 1000) -> None:
    """Ingestion-style adds past exact_max: the shipped store vs the old behaviour (stays flat)."""
    import dataclasses

    from sqlalchemy import insert

    from index.db import make_engine, make_session_factory, upgrade
    from index.models import Image
    from index.repository import create_dataset, get_or_create_model_version
    from index.store import NewEmbedding, RetrievalStore
    from index.vectors import IndexParams

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(100, target // 200), DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = clustered(target, 1, centers)
    queries = clustered(num_queries, 2, centers)
    shipped = IndexParams(exact_max=exact_max, nprobe=8)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/growth.db"
        upgrade(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        with sessions() as session:
            mv = get_or_create_model_version(session, name="growth", checkpoint_sha256="0" * 64, embedding_dim=DIM)
            ds = create_dataset(session, name="growth")
            session.commit()
            mv_id, ds_id = mv.id, ds.id
        stores = {"shipped (follows size)": RetrievalStore(sessions, Path(tmp) / "new", shipped, refresh_seconds=0),
                  "old (kind fixed at build)": RetrievalStore(sessions, Path(tmp) / "old",
                                                              dataclasses.replace(shipped, follow_size=False),
                                                              refresh_seconds=0)}
        writer = next(iter(stores.values()))
        during: list[float] = []
        swaps: list[str] = []

        def shape() -> str:
            index = writer.index(mv_id, "image", DIM)
            return f"ivf nlist {index.index.nlist}" if index.kind == "ivf" else "flat"

        def measure(label: str, n: int) -> None:
            exact = faiss.IndexFlatIP(DIM)
            exact.add(x[:n])
            truth = exact.search(queries, 10)[1] + 1
            for name, store in stores.items():
                store.refresh_seconds = 0
                store.search(mv_id, "image", queries[:1], 10)  # catch up with the log first
                store.refresh_seconds = 5.0  # the default: no log read per query below
                index = store.index(mv_id, "image", DIM)

                def service(q: np.ndarray, store: RetrievalStore = store) -> list[list[int]]:
                    return [[h.image_id for h in hits] for hits in store.search(mv_id, "image", q, 10)]

                p50, p99 = latencies(service, queries)
                rows.append({"when": label, "n": n, "store": name, "kind": f"{index.kind}"
                             + (f" nlist {index.index.nlist}" if index.kind == "ivf" else ""),
                             "p50_ms": p50, "p99_ms": p99, "recall": recall_at_10(np.array(service(queries)), truth)})

        start = time.perf_counter()
        for first in range(0, target, batch):
            stop = min(target, first + batch)
            before = shape() if first else ""
            with sessions() as session:
                session.execute(insert(Image), [{"id": i + 1, "dataset_id": ds_id, "uri": f"file:///{i}.jpg",
                                                 "sha256": f"{i:064x}", "meta": {}, "status": "done"}
                                                for i in range(first, stop)])
                writer.add_embeddings(session, mv_id, {"image": DIM},
                                      [NewEmbedding(i + 1, "image", x[i]) for i in range(first, stop)])
            if first and shape() != before:
                swaps.append(f"{before} -> {shape()} (seen after the batch ending at {stop})")
            if writer.building(mv_id, "image"):
                t = time.perf_counter()
                writer.search(mv_id, "image", queries[first % num_queries][None], 10)  # not blocked by the build
                during.append(time.perf_counter() - t)
            if stop == exact_max:
                measure("before (n = exact_max)", stop)
        ingest = time.perf_counter() - start
        writer.wait()
        measure("after ingestion", target)
        engine.dispose()
    print(f"\ngrowth by ingestion: {target} vectors of dim {DIM} added in batches of {batch} through "
          f"RetrievalStore.add_embeddings ({ingest:.0f}s), exact_max {exact_max}, nprobe {shipped.nprobe}, "
          f"{len(queries)} queries one at a time")
    header = f"{'when':<24}{'n':>9}  {'store':<28}{'index':<16}{'p50 ms':>9}{'p99 ms':>9}{'R@10':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['when']:<24}{r['n']:>9}  {r['store']:<28}{r['kind']:<16}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['recall']:>7.3f}")
    print(f"shipped store, without any rebuild call: {'; '.join(swaps) or 'no swap during ingestion'}; "
          f"after ingestion and the last build: {rows[-2]['kind']}")
    if during:
        print(f"{len(during)} searches made while a background build ran (one per batch): "
              f"p50 {np.percentile(during, 50) * 1e3:.2f} ms, max {max(during) * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=250_000, help="realistic set size (0: skip the peer table)")
    parser.add_argument("--load-n", type=int, default=50_000, help="stored vectors of the HTTP load run (0: skip)")
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="also the easy clustered 512-d set")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--growth", type=int, default=0, help="grow an index to this size by ingestion (0: skip)")
    parser.add_argument("--exact-max", type=int, default=None, help="exact_max of the growth run (default: shipped)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.* when run as a script
    if args.n:
        from bench import search_realistic

        table = search_realistic.run(args.n, args.queries)
        print(f"\nvector search on the realistic set (bench/realistic.py), {args.queries} queries, "
              f"{faiss.omp_get_max_threads()} threads; latency = one query at a time; QPS = one batch of all queries")
        search_realistic.print_table(table)
    if args.load_n:
        from bench import search_load

        search_load.print_table(search_load.run(args.load_n, args.load_seconds), args.load_n)
    if args.growth:
        from index.vectors import IndexParams

        run_growth(args.growth, args.exact_max or IndexParams().exact_max, min(args.queries, 300))
    rows: list[dict[str, object]] = []
    for n in args.sizes:
        run_size(n, args.queries, rows)
    if not rows:
        return
    print(f"\nvector search, dim {DIM}, clustered unit vectors, {args.queries} queries, "
          f"{faiss.omp_get_max_threads()} threads; latency = one query at a time; QPS = one batch of all queries")
    header = f"{'n':>9}  {'path':<38}{'build s':>9}{'mem MB':>9}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>10}{'R@10':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>9}  {r['path']:<38}{r['build_s']:>9.1f}{r['mem_mb']:>9.0f}{r['p50_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['qps']:>10.0f}{r['recall']:>7.3f}  {r.get('note', '')}")


if __name__ == "__main__":
    main()

"""The peer table on bench/realistic.py's set: same vectors, same queries, same run.

Rows: raw FAISS (flat, IVF at the nprobe xdlabel's calibration picks, HNSW, IVF-PQ with exact
re-rank), xdlabel's VectorIndex at its default (recall target 0.95, no hand-set parameter) and its
1 % and 10 % filtered searches, the same for its graph kind (``graph=True``, beside raw FAISS on the
very same graph), the peer libraries (bench/search_peers.py: hnswlib, LanceDB and
Chroma, each skipped with a message when absent; ``pip install 'xdlabel[bench]'``), then the store
over SQLite and PostgreSQL (bench/search_store.py: build from SQL, searches, filters through SQL,
restart).
Latency: one query at a time; QPS: all queries in one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from bench import search_store
from bench.realistic import exact_top, realistic

Row = dict[str, Any]


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(t[:10].tolist())) / 10
                          for f, t in zip(found, truth, strict=True)]))


def timed(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray) -> Row:
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    found = fn(queries)
    batch = time.perf_counter() - start
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3),
            "qps": len(queries) / batch, "recall": recall_at_10(found, truth)}


def row(n: int, path: str, build: float, mem: float, result: Row, note: str = "") -> Row:
    """One table row, printed as it is made (a long run shows its progress)."""
    print(f"  {path}: {result} {note}".rstrip(), flush=True)
    return {"n": n, "path": path, "build_s": build, "mem_mb": mem, **result, "note": note}


def tune(fn: Callable[[int], np.ndarray], truth: np.ndarray, start: int, stop: int) -> int:
    """The smallest power-of-two parameter reaching recall@10 0.95 (the peer's best effort)."""
    value = start
    while value < stop and recall_at_10(fn(value), truth) < 0.95:
        value *= 2
    return min(value, stop)


def run(n: int, num_queries: int, dim: int = 1024) -> list[Row]:
    from index.vectors import IndexParams, VectorIndex, nlist_for, train_size

    rows: list[Row] = []
    data = realistic(n, num_queries, dim=dim)
    x, queries = data.base, data.queries
    ids = np.arange(1, n + 1, dtype=np.int64)
    top_scores, top = exact_top(x, queries, 10)
    truth = top + 1
    print(f"realistic set: {n} x {dim}, {num_queries} queries, best cosine mean {top_scores[:, 0].mean():.3f}",
          flush=True)

    def add(path: str, build: float, mem: float, result: Row, note: str = "") -> None:
        rows.append(row(n, path, build, mem, result, note))

    flat = faiss.IndexFlatIP(dim)
    start = time.perf_counter()
    flat.add(x)
    add("raw FAISS flat (exact)", time.perf_counter() - start, x.nbytes / 2**20,
        timed(lambda q: flat.search(q, 10)[1] + 1, queries, truth))

    # xdlabel's index at its defaults: kind, nlist, training sample and nprobe all its own
    start = time.perf_counter()
    index = VectorIndex.build(dim, ids, x, IndexParams())
    build = time.perf_counter() - start
    nprobe = index.nprobe() if index.kind == "ivf" else 0
    memory = len(faiss.serialize_index(index.index)) / 2**20
    predicted = dict(index.curve).get(nprobe, float("nan"))
    add(f"xdlabel VectorIndex default ({index.kind}, nprobe {nprobe})", build, memory,
        timed(lambda q: index.search(q, 10)[1], queries, truth),
        f"calibrated recall at this nprobe {predicted:.3f}; build incl. calibration")

    if index.kind == "ivf":
        raw = faiss.clone_index(index.index)  # the very same IVF, searched without the wrapper
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        add(f"raw FAISS same IVF{raw.nlist} nprobe {nprobe}", float("nan"), memory,
            timed(lambda q: raw.search(q, 10, params=params)[1], queries, truth))

    truths = {0: truth}
    for share in (1, 10):
        mask = data.buckets < share
        allowed = ids[mask]
        ftruth = truths[share] = allowed[exact_top(x[mask], queries, 10)[1]]
        add(f"xdlabel VectorIndex filter {share}%", float("nan"), memory,
            timed(lambda q, allowed=allowed: index.search(q, 10, allowed=allowed)[1], queries, ftruth),
            "allowed ids given (store: cached per filter)")

    graph_rows(ids, x, queries, truths, data.buckets, add)
    nlist = nlist_for(n, IndexParams())
    sample = x[np.random.default_rng(0).choice(n, train_size(n, IndexParams()), replace=False)]
    start = time.perf_counter()
    if index.kind == "ivf":  # the same coarse lists as xdlabel's IVF: only the PQ is trained here
        quantizer = faiss.clone_index(faiss.downcast_index(index.index.quantizer))
    else:
        quantizer = faiss.IndexFlatIP(dim)
    pq_ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
    pq = faiss.IndexRefineFlat(pq_ivf)
    pq.train(sample)
    pq.add(x)
    pq_build = time.perf_counter() - start

    def pq_search(q: np.ndarray, probe: int, factor: int) -> np.ndarray:
        params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=faiss.SearchParametersIVF(
            nprobe=probe))
        return pq.search(q, 10, params=params)[1] + 1

    # re-rank depth first (with every list probed), then the fewest lists at that depth; on 200 queries
    factor = tune(lambda f: pq_search(queries[:200], nlist, f), truth[:200], 8, 256)
    probe = tune(lambda p: pq_search(queries[:200], p, factor), truth[:200], 8, nlist)
    per_vector = pq_ivf.code_size + 8  # PQ code + id in the inverted lists
    add(f"raw FAISS IVF-PQ{dim // 8} + exact re-rank x{factor}, nprobe {probe}", pq_build,
        n * per_vector / 2**20, timed(lambda q: pq_search(q, probe, factor), queries, truth),
        f"{per_vector} B/vector in RAM (10M: {10e6 * per_vector / 2**30:.1f} GiB) + full vectors {dim * 4} B/vector "
        f"for re-rank (10M: {10e6 * dim * 4 / 2**30:.0f} GiB, mmap-able); build excl. coarse k-means")
    pq.reset()  # its re-rank copy of the vectors: freed before the next rows
    del sample

    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(x)
    hnsw_build = time.perf_counter() - start
    ef = tune(lambda e: hnsw.search(queries, 10, params=faiss.SearchParametersHNSW(efSearch=e))[1] + 1,
              truth, 16, 4096)
    add(f"raw FAISS HNSW32 ef {ef}", hnsw_build, len(faiss.serialize_index(hnsw)) / 2**20,
        timed(lambda q: hnsw.search(q, 10, params=faiss.SearchParametersHNSW(efSearch=ef))[1] + 1, queries, truth))
    hnsw.reset()  # its graph is the largest peer structure: freed before the next rows
    from bench import search_peers  # here: it imports this module's helpers

    rows += search_peers.rows(x, ids, data.buckets, queries, truths)
    rows += search_store.rows(x, queries, data.buckets, truths)
    return rows


def graph_rows(ids: np.ndarray, x: np.ndarray, queries: np.ndarray, truths: dict[int, np.ndarray],
               buckets: np.ndarray, add: Callable[..., None]) -> None:
    """xdlabel's graph kind (``IndexParams(graph=True)``) at its default, its filters, and the very
    same graph searched by raw FAISS at the calibrated beam."""
    from index.vectors import IndexParams, VectorIndex

    dim = x.shape[1]
    start = time.perf_counter()
    # below exact_max a graph is forced (the small run of tests/test_bench_search.py); at sizes past it
    # these are the defaults with graph=True
    index = VectorIndex.build(dim, ids, x, IndexParams(graph=True, exact_max=min(20_000, len(ids) // 2)))
    build = time.perf_counter() - start
    ef = index.nprobe()
    memory = len(faiss.serialize_index(index.index)) / 2**20
    predicted = dict(index.curve).get(ef, float("nan"))
    add(f"xdlabel VectorIndex graph=True ({index.kind}, ef {ef})", build, memory,
        timed(lambda q: index.search(q, 10)[1], queries, truths[0]),
        f"calibrated recall at this ef {predicted:.3f}; build incl. calibration")
    raw, params = faiss.downcast_index(index.index.index), faiss.SearchParametersHNSW(efSearch=ef)
    assert np.array_equal(faiss.vector_to_array(index.index.id_map), ids)  # graph position i holds ids[i]
    add(f"raw FAISS same HNSW{raw.hnsw.nb_neighbors(1)} ef {ef}", float("nan"), memory,
        timed(lambda q: ids[raw.search(q, 10, params=params)[1]], queries, truths[0]))
    for share in (1, 10):
        allowed = ids[buckets < share]
        add(f"xdlabel VectorIndex graph=True filter {share}%", float("nan"), memory,
            timed(lambda q, allowed=allowed: index.search(q, 10, allowed=allowed)[1], queries, truths[share]),
            "exact over the allowed ids")


def print_table(rows: list[Row]) -> None:
    header = f"{'n':>8}  {'path':<68}{'build s':>9}{'mem MB':>9}{'p50 ms':>8}{'p99 ms':>8}{'QPS':>8}{'R@10':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>8}  {r['path']:<68}{r['build_s']:>9.1f}{r['mem_mb']:>9.0f}{r['p50_ms']:>8.2f}"
              f"{r['p99_ms']:>8.2f}{r['qps']:>8.0f}{r['recall']:>7.3f}  {r.get('note', '')}".rstrip())

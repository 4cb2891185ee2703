"""Peer libraries on the realistic set, same vectors and queries as the rest of the table.

hnswlib (HNSW), LanceDB (IVF-PQ with refine, prefiltered searches) and Chroma (HNSW, ``where``
filters), each skipped with a message when not installed (``pip install 'xdlabel[bench]'``). Each
gets its best effort: the smallest power-of-two search parameter reaching recall@10 0.95 unfiltered;
filtered rows keep it. Filters are the set's buckets: bucket 0 is 1 % of the rows, buckets < 10 are 10 %.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.search_realistic import Row, row, timed, tune

Truths = dict[int, np.ndarray]  # filter share in % (0: none) -> true top-10 ids per query


def rows(x: np.ndarray, ids: np.ndarray, buckets: np.ndarray, queries: np.ndarray, truths: Truths) -> list[Row]:
    out: list[Row] = []
    for peer in (_hnswlib, _lancedb, _chroma):
        out += peer(x, ids, buckets, queries, truths)
    return out


def _missing(name: str) -> list[Row]:
    print(f"{name} not installed (pip install 'xdlabel[bench]'): no {name} rows", flush=True)
    return []


def _hnswlib(x: np.ndarray, ids: np.ndarray, buckets: np.ndarray, queries: np.ndarray, truths: Truths) -> list[Row]:
    try:
        import hnswlib
    except ImportError:
        return _missing("hnswlib")
    n, dim = x.shape
    start = time.perf_counter()
    peer = hnswlib.Index(space="ip", dim=dim)
    peer.init_index(max_elements=n, ef_construction=100, M=16)
    peer.add_items(x, ids)
    build = time.perf_counter() - start

    def knn(q: np.ndarray, ef: int) -> np.ndarray:
        peer.set_ef(ef)
        return np.asarray(peer.knn_query(q, k=10)[0])

    ef = tune(lambda e: knn(queries, e), truths[0], 16, 4096)
    return [row(n, f"hnswlib M16 ef {ef}", build, n * (dim * 4 + 136) / 2**20,
                 timed(lambda q: knn(q, ef), queries, truths[0]))]


def _lancedb(x: np.ndarray, ids: np.ndarray, buckets: np.ndarray, queries: np.ndarray, truths: Truths) -> list[Row]:
    try:
        import lancedb
        import pyarrow as pa
    except ImportError:
        return _missing("lancedb")
    n, dim = x.shape
    out: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        table = lancedb.connect(tmp).create_table("v", pa.table({
            "id": ids, "bucket": buckets.astype(np.int32),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}))
        start = time.perf_counter()
        table.create_index(metric="dot", num_partitions=int(4 * np.sqrt(n)), num_sub_vectors=dim // 8)
        table.create_scalar_index("bucket")
        build = time.perf_counter() - start

        def lance(q: np.ndarray, probes: int, factor: int, where: str | None = None) -> np.ndarray:
            found = []
            for v in q:
                search = table.search(v).metric("dot").nprobes(probes).refine_factor(factor).limit(10)
                if where is not None:
                    search = search.where(where, prefilter=True)
                found.append(_padded(search.to_arrow()["id"].to_numpy()))
            return np.array(found)

        # as raw FAISS's IVF-PQ row: the re-rank depth first (every partition probed), then the fewest
        # partitions at that depth; on 100 queries
        factor = tune(lambda f: lance(queries[:100], 1024, f), truths[0][:100], 8, 256)
        probes = tune(lambda p: lance(queries[:100], p, factor), truths[0][:100], 8, 1024)
        out.append(row(n, f"LanceDB IVF-PQ nprobes {probes} refine x{factor}", build, float("nan"),
                        timed(lambda q: lance(q, probes, factor), queries[:200], truths[0][:200]), "200 queries"))
        for share in (1, 10):
            out.append(row(n, f"LanceDB filter {share}% (prefilter)", float("nan"), float("nan"),
                            timed(lambda q, s=share: lance(q, probes, factor, f"bucket < {s}"), queries[:200],
                                  truths[share][:200]), "200 queries"))
    return out


def _chroma(x: np.ndarray, ids: np.ndarray, buckets: np.ndarray, queries: np.ndarray, truths: Truths) -> list[Row]:
    try:
        import chromadb
    except ImportError:
        return _missing("chromadb")
    n, _ = x.shape
    out: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        client = chromadb.PersistentClient(path=tmp)
        collection = client.create_collection("bench", configuration={"hnsw": {
            "space": "ip", "ef_construction": 100, "max_neighbors": 16}})
        start = time.perf_counter()
        step = client.get_max_batch_size()
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            collection.add(ids=[str(i) for i in ids[lo:hi]], embeddings=x[lo:hi],
                           metadatas=[{"bucket": int(b)} for b in buckets[lo:hi]])
        build = time.perf_counter() - start

        def search(where: dict[str, Any] | None) -> Callable[[np.ndarray], np.ndarray]:
            def run(q: np.ndarray) -> np.ndarray:
                found = collection.query(query_embeddings=q, n_results=10, where=where, include=[])["ids"]
                return np.array([_padded(np.array([int(i) for i in hits], np.int64)) for hits in found])
            return run

        def at_ef(ef: int) -> np.ndarray:
            # A changed ef_search reaches the loaded index only once the client's cache is dropped.
            nonlocal client, collection
            collection.modify(configuration={"hnsw": {"ef_search": ef}})
            client.clear_system_cache()
            client = chromadb.PersistentClient(path=tmp)
            collection = client.get_collection("bench")
            return search(None)(queries)

        ef = tune(at_ef, truths[0], 16, 4096)
        at_ef(ef)
        out.append(row(n, f"Chroma HNSW M16 ef {ef}", build, float("nan"), timed(search(None), queries, truths[0]),
                        "build = adds in batches"))
        for share in (1, 10):
            out.append(row(n, f"Chroma filter {share}% (where)", float("nan"), float("nan"),
                            timed(search({"bucket": {"$lt": share}}), queries, truths[share])))
    return out


def _padded(found: np.ndarray) -> np.ndarray:
    """Ten ids (missing hits as -1), so that a short answer still stacks into a matrix."""
    return np.concatenate([found[:10], np.full(max(0, 10 - len(found)), -1, np.int64)])

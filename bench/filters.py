"""Filtered search on the realistic set: how FAISS tests "is this id allowed", and xdlabel's index.

One IVF index (xdlabel's default build) over ``--n`` realistic vectors (``bench.realistic``); the 1 %
and 10 % filters of its buckets. Rows, one query at a time, FAISS on one thread:

* raw FAISS, every list probed, the allowed ids as ``IDSelectorBatch`` (a hash set behind a Bloom
  filter; what xdlabel used before) and as ``IDSelectorBitmap`` (one bit per id), the selector built
  per query as a search would;
* xdlabel's ``VectorIndex.search(allowed=...)`` at its default recall target (it picks the lists).

Recall@10 is against the exact top-10 among the allowed vectors.

    python bench/filters.py --n 250000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.*, index.* when run as a script

from bench.realistic import exact_top, realistic  # noqa: E402
from bench.search_realistic import recall_at_10  # noqa: E402
from index.vectors import IndexParams, VectorIndex, allowed_selector  # noqa: E402


def measure(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray
            ) -> tuple[float, float, float]:
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(search(q[None])[0])
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 99)) * 1e3, recall_at_10(found, truth)


def paths(index: VectorIndex, allowed: np.ndarray) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    ivf = index.index

    def raw(make: Callable[[np.ndarray], faiss.IDSelector]) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            params = faiss.SearchParametersIVF(nprobe=ivf.nlist)
            selector = make(allowed)  # built per query, as a search does
            params.sel = selector
            return ivf.search(q, 10, params=params)[1]
        return search

    return [("raw FAISS, every list, IDSelectorBatch", raw(faiss.IDSelectorBatch)),
            ("raw FAISS, every list, IDSelectorBitmap", raw(allowed_selector)),
            ("xdlabel VectorIndex, default target", lambda q: index.search(q, 10, allowed=allowed)[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    data = realistic(args.n, num_queries=args.queries)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    start = time.perf_counter()
    index = VectorIndex.build(data.base.shape[1], ids, data.base, IndexParams())
    print(f"{index.kind} index of {args.n} built in {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    for share in (1, 10):
        chosen = data.buckets < share
        allowed = ids[chosen]
        _, positions = exact_top(data.base[chosen], data.queries)
        for name, search in paths(index, allowed):
            p50, p99, recall = measure(search, data.queries, allowed[positions])
            rows.append((f"{share}%", name, p50, p99, recall))
            print(f"  {share:>2}% {name}: p50 {p50:.2f} ms", flush=True)
    print(f"\nFiltered search, {args.n:,} realistic 1024-d vectors, {args.queries} queries, FAISS on one thread\n")
    print(f"{'filter':>6}  {'path':42s} {'p50 ms':>8} {'p99 ms':>8} {'R@10':>6}")
    print("-" * 76)
    for share, name, p50, p99, recall in rows:
        print(f"{share:>6}  {name:42s} {p50:8.2f} {p99:8.2f} {recall:6.3f}")


if __name__ == "__main__":
    main()

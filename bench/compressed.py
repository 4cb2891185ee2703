"""Memory, recall and latency of each index kind on bench/realistic.py's set, and the 10M projection.

Rows, same vectors and queries in one run: raw FAISS flat (exact, the baseline), xdlabel's IVF-Flat
and its compressed IVF-PQ with exact re-ranking from memory-mapped full vectors (all at their
defaults: recall target 0.95, nothing hand-set), the compressed index encoding in its learned
rotation (OPQ, as shipped) and without it (plain PQ, the path before), and raw FAISS OPQ + IVF-PQ +
IndexRefineFlat at the very parameters xdlabel's calibration chose (the same search without the
wrapper, full vectors in RAM).
RAM is bytes per vector of what stays resident (the FAISS index, id maps); disk is the full vectors
a compressed index reads from its files. Latency: one query at a time; QPS: all queries in one batch.

    python bench/compressed.py                 # 250,000 x 1024
    python bench/compressed.py --n 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.realistic import exact_top, realistic  # noqa: E402
from bench.search_realistic import timed  # noqa: E402
from index.vectors import IndexParams, VectorIndex  # noqa: E402

OWNERS = 16  # id -> image id map, bytes per vector (two int64 arrays)


def run(n: int, num_queries: int, dim: int = 1024) -> list[dict[str, Any]]:
    data = realistic(n, num_queries, dim=dim)
    x, queries = data.base, data.queries
    ids = np.arange(1, n + 1, dtype=np.int64)
    truth = exact_top(x, queries, 10)[1] + 1
    rows: list[dict[str, Any]] = []

    def add(path: str, build: float, ram: float, disk: float, result: dict[str, Any]) -> None:
        rows.append({"n": n, "path": path, "build_s": build, "ram_b": ram, "disk_b": disk, **result})
        print(f"  {path}: build {build:.0f} s, {ram:.0f} B/vector RAM, {result}", flush=True)

    flat = faiss.IndexFlatIP(dim)
    start = time.perf_counter()
    flat.add(x)
    add("raw FAISS flat (exact)", time.perf_counter() - start, 4 * dim, 0,
        timed(lambda q: flat.search(q, 10)[1] + 1, queries, truth))
    flat.reset()

    add(*_ivf_row(dim, ids, x, queries, truth))  # its 4 GiB at 1M freed before the copies below

    for rotate in (True, False):  # OPQ as shipped, then plain PQ (the path before it)
        for found in _compressed_rows(dim, ids, x, queries, truth, rotate):
            add(*found)
    return rows


def _compressed_rows(dim: int, ids: np.ndarray, x: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                     rotate: bool) -> list[tuple[str, float, float, float, dict[str, Any]]]:
    """xdlabel's compressed index at its defaults, with the learned rotation or without; with it,
    also raw FAISS IndexRefineFlat over the very same trained IVF-PQ at the same parameters."""
    n = len(ids)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.faiss"
        start = time.perf_counter()
        pq = VectorIndex.build(dim, ids, x, IndexParams(exact_max=0, compress_past=0, rotate=rotate), path=path)
        pq.save(path)
        build = time.perf_counter() - start
        assert pq.kind == "ivfpq" and pq.full is not None and (pq.rotation is not None) == rotate
        # resident: codes and lists, the id map, the full-vector lookup (sorted ids + positions), the rotation
        rotation_bytes = 0 if pq.rotation is None else pq.rotation.nbytes
        ram = (len(faiss.serialize_index(pq.index)) + rotation_bytes) / n + OWNERS + 16
        nprobe, depth = pq.nprobe(), pq.rerank
        name = f"xdlabel IVF-PQ{pq.index.pq.M}{' + OPQ' if rotate else ' plain'} + mmap re-rank x{depth}"
        rows = [(f"{name} (nprobe {nprobe})", build, ram, 4 * dim,
                 timed(lambda q: pq.search(q, 10)[1], queries, truth))]
        if pq.rotation is None:
            return rows
        rotation = pq.rotation
        base = faiss.clone_index(pq.index)  # refilled with its vectors in RAM, rotated as its codes are
        base.reset()
        base.set_direct_map_type(faiss.DirectMap.NoMap)
        refine = faiss.IndexRefineFlat(base)
        refine.add(x @ rotation.T)
        params = faiss.IndexRefineSearchParameters(k_factor=depth,
                                                   base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
        rows.append((f"raw FAISS same OPQ + IVF-PQ + IndexRefineFlat x{depth} (nprobe {nprobe})", float("nan"),
                     ram - OWNERS - 16 + 4 * dim, 0,
                     timed(lambda q: refine.search(q @ rotation.T, 10, params=params)[1] + 1, queries, truth)))
        refine.reset()
        return rows


def _ivf_row(dim: int, ids: np.ndarray, x: np.ndarray, queries: np.ndarray, truth: np.ndarray
             ) -> tuple[str, float, float, float, dict[str, Any]]:
    start = time.perf_counter()
    ivf = VectorIndex.build(dim, ids, x, IndexParams())
    build = time.perf_counter() - start
    ram = len(faiss.serialize_index(ivf.index)) / len(ids) + OWNERS
    probed = f", nlist {ivf.index.nlist}, nprobe {ivf.nprobe()}" if ivf.kind == "ivf" else ""
    return (f"xdlabel default ({ivf.kind}{probed})", build, ram, 0,
            timed(lambda q: ivf.search(q, 10)[1], queries, truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[250_000])
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    rows = [row for n in args.n for row in run(n, args.queries)]
    header = (f"{'n':>8}  {'path':<66}{'build s':>9}{'RAM B/vec':>10}{'disk B/vec':>11}{'10M RAM GiB':>12}"
              f"{'p50 ms':>8}{'p99 ms':>8}{'QPS':>7}{'R@10':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>8}  {r['path']:<66}{r['build_s']:>9.0f}{r['ram_b']:>10.0f}{r['disk_b']:>11.0f}"
              f"{r['ram_b'] * 10e6 / 2**30:>12.1f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['qps']:>7.0f}"
              f"{r['recall']:>7.3f}")


if __name__ == "__main__":
    main()

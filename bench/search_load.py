"""Search throughput under concurrent clients over real HTTP, with the bundled model.

A uvicorn server over a SQLite store of bench/realistic.py vectors (the model's image dimension);
16 and 64 client threads, each connected before the clock starts, post /v1/search/text for a
fixed time, with repeated texts (8 texts reused) and distinct texts (a new text every request).
Each is run twice in the same process: as shipped (query-text cache + micro-batched encodes) and
as a baseline with both off (cache size 0, no batching window, batches of one: a model call per
request, except that identical texts in flight at once still share one). Clients and server
share this process (and its GIL) and the machine.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def run(n: int, seconds: float, clients: tuple[int, ...] = (16, 64)) -> list[dict[str, Any]]:
    import httpx

    from bench.realistic import realistic
    from bench.search import populate_sql
    from index.db import upgrade
    from xdlabel.api.auth import create_api_key
    from xdlabel.api.inthread import ThreadedServer
    from xdlabel.services import Services
    from xdlabel.settings import Settings
    from xdlabel.textqueries import TextQueries

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/load.db"
        upgrade(url)
        services = Services(Settings(data_dir=Path(tmp), database_url=url))
        dim = services.predictor.model.config.dim_proj * 2
        model = services.model  # registers the model version
        populate_sql(url, realistic(n, 1, dim=dim).base, dim, model_version_id=model.version_id)
        services.store.index(model.version_id, "image", model.image_dim)  # loaded before the clock starts
        with services.sessions() as session:
            key = create_api_key(session, "bench")
        server = ThreadedServer(services)
        base = server.__enter__()
        counter = itertools.count()
        for mode, shipped in (("baseline: no cache, no batching", False), ("shipped: cache + batching", True)):
            for workload in ("repeated", "distinct"):
                for count in clients:
                    encoder = (TextQueries(services.predictor.text_query_embeddings, services.model_lock)
                               if shipped else
                               TextQueries(services.predictor.text_query_embeddings, services.model_lock, size=0,
                                           window=0, max_batch=1))
                    services.text_queries["image"] = encoder
                    times: list[float] = []
                    errors: list[int] = []
                    window: list[float] = []  # the measured interval, from when every client is connected

                    def open_window(window: list[float] = window) -> None:
                        now = time.perf_counter()
                        window[:] = [now, now + seconds]

                    ready = threading.Barrier(count + 1, action=open_window)  # runs before any thread goes on

                    def client(seed: int, workload: str = workload, times: list[float] = times,
                               errors: list[int] = errors, ready: threading.Barrier = ready,
                               window: list[float] = window) -> None:
                        rng = np.random.default_rng(seed)
                        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=120) as http:
                            http.get("/health")  # connected before the clock starts
                            ready.wait()
                            while time.perf_counter() < window[1]:
                                text = (f"a photo of shape {int(rng.integers(0, 8))}" if workload == "repeated"
                                        else f"a photo of thing {next(counter)}")
                                start = time.perf_counter()
                                r = http.post("/v1/search/text", json={"query": text, "k": 10})
                                times.append(time.perf_counter() - start)
                                if r.status_code != 200:
                                    errors.append(r.status_code)

                    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
                    for t in threads:
                        t.start()
                    ready.wait()
                    for t in threads:
                        t.join()
                    wall = time.perf_counter() - window[0]  # includes the requests in flight at the end
                    rows.append({"mode": mode, "workload": workload, "clients": count, "qps": len(times) / wall,
                                 "p50_ms": float(np.percentile(times, 50) * 1e3),
                                 "p99_ms": float(np.percentile(times, 99) * 1e3), "errors": len(errors),
                                 "model_calls": encoder.calls, "requests": len(times)})
                    print(f"  {rows[-1]}", flush=True)
        server.__exit__()
        services.engine.dispose()
    return rows


def print_table(rows: list[dict[str, Any]], n: int) -> None:
    print(f"\nHTTP /v1/search/text under load: bundled model, {n} stored vectors (SQLite), clients and server "
          f"in one process on this machine")
    header = f"{'mode':<34}{'texts':<10}{'clients':>8}{'QPS':>8}{'p50 ms':>9}{'p99 ms':>9}{'calls':>7}{'errors':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<34}{r['workload']:<10}{r['clients']:>8}{r['qps']:>8.0f}{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['model_calls']:>7}{r['errors']:>7}")

"""Search throughput under concurrent clients over real HTTP, with the bundled model.

A uvicorn server over a SQLite store of bench/realistic.py vectors (the model's image dimension)
runs in a process of its own, as it would in production; 16 and 64 client threads in this process,
each connected before the clock starts, post /v1/search/text for a fixed time, with repeated texts
(8 texts reused) and distinct texts (a new text every request). Each is run against two servers:
as shipped (query-text cache + micro-batched encodes) and a baseline with both off (cache size 0,
no batching window, batches of one: a model call per request, except that identical texts in
flight at once still share one); then the production command, ``xdlabel serve --workers 2`` (two
server processes on one port; their model calls are not counted).

Clients and servers share this machine's cores, so the clients' own cost is part of every figure.
Each row is measured twice, interleaved: with clients on the standard library's ``http.client``
(HTTP/1.1 keep-alive, little work per request) and on ``httpx`` (the client the tests use), whose
heavier per-request work in 64 threads under one GIL adds queueing of its own to the latencies.
"client CPU" is the share of the machine's cores the clients' process used in the measured
interval: what the clients took from the servers.
For the two-process server the table gives how the connections were spread over the two processes
when the clock started and when it stopped.

    python -m bench.search_load --serve DATA_DIR DATABASE_URL shipped|baseline   (the server process)
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
CLIENTS = ("http.client", "httpx")
MODES = (("baseline: no cache, no batching", "baseline"), ("shipped: cache + batching", "shipped"))


def run(n: int, seconds: float, clients: tuple[int, ...] = (16, 64)) -> list[dict[str, Any]]:
    from bench.realistic import realistic
    from bench.search import populate_sql
    from index.db import upgrade
    from xdlabel.api.auth import create_api_key
    from xdlabel.services import Services
    from xdlabel.settings import Settings

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/load.db"
        upgrade(url)
        services = Services(Settings(data_dir=Path(tmp), database_url=url))
        dim = services.predictor.model.config.dim_proj * 2
        model = services.model  # registers the model version
        populate_sql(url, realistic(n, 1, dim=dim).base, dim, model_version_id=model.version_id)
        with services.sessions() as session:
            key = create_api_key(session, "bench")
        services.engine.dispose()
        counter = itertools.count()
        for mode, name in MODES:
            with _server(tmp, url, name) as (base, calls):
                for workload in ("repeated", "distinct"):
                    for count in clients:
                        for client in CLIENTS:  # interleaved, so both meet the server in the same state
                            before = calls()
                            row = _measure(base, key, workload, count, seconds, counter, client)
                            rows.append({"mode": mode, "workload": workload, "clients": count,
                                         "model_calls": calls() - before, **row})
                            print(f"  {rows[-1]}", flush=True)
        with _cli_server(tmp, url, WORKERS) as base:
            for workload in ("repeated", "distinct"):
                for count in clients:
                    for client in CLIENTS:  # interleaved, so both meet the server in the same state
                        row = _measure(base, key, workload, count, seconds, counter, client)
                        rows.append({"mode": f"shipped: xdlabel serve --workers {WORKERS}", "workload": workload,
                                     "clients": count, "model_calls": None, **row})
                        print(f"  {rows[-1]}", flush=True)
    return rows


@contextmanager
def _cli_server(data_dir: str, url: str, workers: int) -> Iterator[str]:
    """``xdlabel serve --workers N`` on a free port, answering searches (each worker warmed) before
    the clock starts."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XDLABEL_DATA_DIR": data_dir, "XDLABEL_DATABASE_URL": url}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "xdlabel"), "serve", "--workers", str(workers),
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"xdlabel serve did not start (exit {proc.poll()})")
            time.sleep(0.5)
        time.sleep(20)  # each worker's background warm-up: the model and the index loaded, then frozen
        yield base
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True``: its supervisor, then whatever of its
    workers is left, in any state."""
    proc.terminate()
    try:
        proc.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left: all exited
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def _server(data_dir: str, url: str, mode: str) -> Iterator[tuple[str, Any]]:
    """The server process; yields its URL and a function reading its model-call count."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.search_load", "--serve", data_dir, url, mode],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def calls() -> int:
        stdin.write("calls\n")
        stdin.flush()
        return int(stdout.readline())

    try:
        base = stdout.readline().strip()
        if not base.startswith("http"):
            raise RuntimeError(f"the server process did not start (exit {proc.poll()})")
        yield base, calls
    finally:
        stdin.close()
        proc.wait(30)


class _StdlibClient:
    """One keep-alive connection through ``http.client``: little work per request beyond the socket."""

    def __init__(self, base: str, key: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.headers = {"X-API-Key": key, "Content-Type": "application/json"}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        self.connection.request(method, path, None if body is None else json.dumps(body), self.headers)
        response = self.connection.getresponse()
        response.read()  # the connection is reused only once the body is read
        return response.status

    def close(self) -> None:
        self.connection.close()


class _HttpxClient:
    def __init__(self, base: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=120)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        return self.http.request(method, path, json=body).status_code

    def close(self) -> None:
        self.http.close()


def _measure(base: str, key: str, workload: str, count: int, seconds: float, counter: Iterator[int],
             client_kind: str = "http.client") -> dict[str, Any]:
    make = _StdlibClient if client_kind == "http.client" else _HttpxClient
    times: list[float] = []
    errors: list[int] = []
    window: list[float] = []  # the measured interval, from when every client is connected
    splits: list[list[int]] = []  # connections per server process, when the clock starts and ends

    def open_window() -> None:
        splits.append(_connections_per_process(base))
        now = time.perf_counter()
        window[:] = [now, now + seconds, time.process_time()]

    ready = threading.Barrier(count + 1, action=open_window)  # runs before any thread goes on
    done = threading.Barrier(count, action=lambda: splits.append(_connections_per_process(base)))

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        http = make(base, key)
        try:
            http.request("GET", "/health")  # connected before the clock starts
            ready.wait()
            while time.perf_counter() < window[1]:
                text = (f"a photo of shape {int(rng.integers(0, 8))}" if workload == "repeated"
                        else f"a photo of thing {next(counter)}")
                start = time.perf_counter()
                status = http.request("POST", "/v1/search/text", {"query": text, "k": 10})
                times.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(status)
            done.wait()
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - window[0]  # includes the requests in flight at the end
    cpu = time.process_time() - window[2]  # every client thread's
    return {"client": client_kind, "qps": len(times) / wall, "p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3), "errors": len(errors), "requests": len(times),
            "split": splits, "client_cpu": cpu / wall / (os.cpu_count() or 1)}


def _connections_per_process(base: str) -> list[int]:
    """How many of the established connections to the server's port each server process holds,
    most first (from ``ss``; empty where it is missing)."""
    if shutil.which("ss") is None:
        return []
    port = base.rsplit(":", 1)[1]
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", listing):
        counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


def serve(data_dir: str, url: str, mode: str) -> None:
    """The server process: the store's index and the model loaded before its URL is printed;
    then each stdin line "calls" is answered with the model calls made so far, until stdin closes."""
    from xdlabel.api.app import warm_up
    from xdlabel.api.inthread import ThreadedServer
    from xdlabel.services import Services
    from xdlabel.settings import Settings
    from xdlabel.textqueries import TextQueries

    services = Services(Settings(data_dir=Path(data_dir), database_url=url))
    embed = services.predictor.text_query_embeddings
    encoder = (TextQueries(embed, services.model_lock) if mode == "shipped" else
               TextQueries(embed, services.model_lock, size=0, window=0, max_batch=1))
    services.text_queries["image"] = encoder
    encoder.vectors(["warm up"])
    warm_up(services)  # as `xdlabel serve` does at startup; here before the clock starts
    with ThreadedServer(services) as base:
        print(base, flush=True)
        for line in sys.stdin:
            if line.strip() == "calls":
                print(encoder.calls, flush=True)
    services.close()  # the index saved: the next server loads it instead of rebuilding


def print_table(rows: list[dict[str, Any]], n: int) -> None:
    print(f"\nHTTP /v1/search/text under load: bundled model, {n} stored vectors (SQLite), servers in processes "
          f"of their own, clients in this one, on this machine")
    header = (f"{'mode':<36}{'client':<13}{'texts':<10}{'clients':>8}{'split':>14}{'QPS':>7}{'p50 ms':>8}"
              f"{'p99 ms':>8}{'client CPU':>11}{'calls':>7}{'errors':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        calls = "-" if r["model_calls"] is None else r["model_calls"]
        split = "->".join("/".join(map(str, s)) for s in r["split"]) if len(r["split"][0]) > 1 else "-"
        print(f"{r['mode']:<36}{r['client']:<13}{r['workload']:<10}{r['clients']:>8}{split:>14}{r['qps']:>7.0f}"
              f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['client_cpu']:>11.0%}{calls:>7}{r['errors']:>7}")


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(*sys.argv[2:5])

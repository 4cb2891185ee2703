"""``xdlabel serve --workers 2``, the real command: two server processes on one port answer the
same searches, a revoked key is refused by every process from the next request, and a worker
killed with SIGKILL under load is replaced while the other keeps answering. With the ML backend on
(its per-project state lives in one process) more than one worker is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from index.db import upgrade
from xdlabel.api.auth import create_api_key
from xdlabel.services import Services
from xdlabel.settings import Settings

XDLABEL = str(Path(sys.executable).parent / "xdlabel")
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
QUERY = {"query": "a red circle on sand", "k": 5}


def children(pid: int) -> list[int]:
    """The live worker processes of ``pid`` (from /proc: no extra dependency), not counting
    multiprocessing's resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in command:
                found.append(int(entry.name))
    return found


def wait_for(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, str, int, dict[str, str]]]:
    from bench.search import populate_sql
    from bench.search_load import stop_group

    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(url)
    services = Services(Settings(data_dir=tmp_path, database_url=url))
    model = services.model
    populate_sql(url, np.random.default_rng(0).standard_normal((300, model.image_dim)).astype("float32"),
                 model.image_dim, model_version_id=model.version_id)
    with services.sessions() as session:
        key = create_api_key(session, "workers")
    services.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path), "XDLABEL_DATABASE_URL": url}
    env.pop("XDLABEL_ML_BACKEND_PASSWORD", None)
    proc = subprocess.Popen([XDLABEL, "serve", "--workers", "2", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2, 60, "two worker processes")
        wait_for(lambda: _answers(base, key), 120, "searches answered")
        yield base, key, proc.pid, env
    finally:
        stop_group(proc)


def _answers(base: str, key: str) -> bool:
    try:
        return httpx.post(f"{base}/v1/search/text", json=QUERY, headers={"X-API-Key": key},
                          timeout=60).status_code == 200
    except httpx.TransportError:
        return False


def test_more_than_one_worker_is_refused_with_the_ml_backend_on(tmp_path: Path) -> None:
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path), "XDLABEL_ML_BACKEND_PASSWORD": "pw"}
    done = subprocess.run([XDLABEL, "serve", "--workers", "2", "--port", "9"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "ML backend" in done.stderr and "--workers 1" in done.stderr
    bad = subprocess.run([XDLABEL, "serve", "--workers", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr


def test_two_workers_answer_alike_refuse_a_revoked_key_and_survive_a_killed_worker(served) -> None:  # type: ignore[no-untyped-def]
    base, key, pid, _ = served
    headers = {"X-API-Key": key}
    # every request on a new connection, so the kernel spreads them over both processes
    answers = [httpx.post(f"{base}/v1/search/text", json=QUERY, headers=headers, timeout=60) for _ in range(40)]
    assert {r.status_code for r in answers} == {200}
    hits = {tuple((h["image_id"], h["score"]) for h in r.json()["hits"]) for r in answers}
    assert len(hits) == 1 and len(next(iter(hits))) == 5  # both processes give the same answer

    # kill -9 one worker under load from 8 clients: the other answers; the supervisor starts a new one
    workers = children(pid)
    assert len(workers) == 2
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                statuses.append(httpx.post(f"{base}/v1/search/text", json=QUERY, headers=headers,
                                           timeout=60).status_code)
            except httpx.TransportError:
                statuses.append(-1)  # a request the killed worker held

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(2.0)
    after_kill = len(statuses)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    later = statuses[after_kill:]
    assert later and all(s == 200 for s in later), later  # answered while the killed one was replaced
    assert statuses.count(-1) <= 8  # at most the requests in flight on the killed worker
    wait_for(lambda: len(children(pid)) == 2 and workers[0] not in children(pid), 60, "a replacement worker")
    wait_for(lambda: _answers(base, key), 120, "the replacement to answer")

    # revoke through the API (one process); 40 requests on new connections are refused by both
    key_id = next(k["id"] for k in httpx.get(f"{base}/v1/keys", headers=headers, timeout=60).json()
                  if k["name"] == "workers")
    assert httpx.delete(f"{base}/v1/keys/{key_id}", headers=headers, timeout=60).status_code in (200, 204)
    refused = [httpx.post(f"{base}/v1/search/text", json=QUERY, headers=headers, timeout=60).status_code
               for _ in range(40)]
    assert set(refused) == {401}

"""Parts for fault-injection trials: a local image origin with dead, slow and flaky URLs, xdlabel
processes that can be killed with SIGKILL, and a SQLite write lock held from outside.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from PIL import Image, ImageDraw

from annotator.localserver import free_port

__all__ = ["Origin", "Processes", "dead_url", "free_port", "hold_sqlite_lock", "kill_9_rounds", "scene", "wait_for",
           "wait_http"]
T = TypeVar("T")


def scene(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small PNG whose content depends only on ``seed`` (so two seeds never collide)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, 20, 2))
    draw.ellipse([x, y, x + 20, y + 16], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.point([(0, 0)], fill=(seed % 256, seed // 256 % 256, 7))  # distinct bytes for every seed
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class Origin:
    """An HTTP server on 127.0.0.1: ``/img/<name>`` serves registered bytes, ``/slow`` drips one
    byte every 0.3 s, ``/flaky/<name>`` answers 503 on the first request and the image after."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                origin.hits[self.path] += 1
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind == "slow":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b"\x89")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass  # the client gave up, as it should
                    return
                if kind == "flaky" and origin.hits[self.path] == 1:
                    self.send_error(503)
                    return
                data = origin.files.get(name)
                if kind not in ("img", "flaky") or data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def dead_url() -> str:
    """A URL on a port where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/gone.png"


class Processes:
    """xdlabel command-line processes of one trial, each in its own session so that SIGKILL takes
    its whole process group; every one still alive is killed when the trial ends."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "xdlabel.cli", *args], env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append(process)
        return process

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xdlabel.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    @staticmethod
    def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait(30)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                self.kill(process)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """The first truthy value ``check`` returns within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def wait_http(url: str, timeout: float = 60) -> None:
    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout, url)


def hold_sqlite_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes SQLite's write lock (BEGIN IMMEDIATE) and keeps it ``seconds``:
    every writer meanwhile meets "database is locked" unless it waits."""

    def hold() -> None:
        conn = sqlite3.connect(path, timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(seconds)
            conn.rollback()
        finally:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def kill_9_rounds(script: str, path: Path, rounds: int, seed: int) -> Iterator[int]:
    """Run ``python -c script path start`` ``rounds`` times (``start``: an id range of its own per
    round), each killed with SIGKILL at a seeded random moment 0.05-1 s after it prints "ready";
    yields the round number after each kill, for the caller to check what the run left."""
    rng = np.random.default_rng(seed)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for round_ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(1_000_000 * (round_ + 1))],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.05, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        yield round_

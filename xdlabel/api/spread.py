"""Keep-alive connections spread evenly over the processes of ``xdlabel serve --workers N``.

The workers share one listening socket, and a worker woken by a burst of connects accepts every
connection queued, so 16 clients connecting at once were measured split 15/1; a keep-alive
connection then stays on the process that accepted it, and one process queues requests that the
other could answer. Here each worker publishes its open connections in a slot of a small file the
supervisor creates (``CONNECTION_BOARD_VARIABLE`` names it). A worker holding more than its even
share plus one answers a request with ``Connection: close``; the client's reconnect is accepted by
whichever process reaches the socket first. A reconnect may land back where it was and be let go
again, so a worker lets at most one connection go every ``SHED_INTERVAL`` seconds: that bounds the
churn while connections settle.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

CONNECTION_BOARD_VARIABLE = "XDLABEL_CONNECTION_BOARD"
SLOTS = 256  # more worker processes than any one machine runs
SHED_INTERVAL = 0.01
LIVENESS_INTERVAL = 0.5


class ConnectionBoard:
    """One row per worker process: its pid and its open connections, less those it is letting go.
    Only the worker's event-loop thread uses its board, so nothing here locks but the slot claim."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), SLOTS * 16)
        self._rows = np.frombuffer(self._map, dtype=np.int64).reshape(SLOTS, 2)
        self._path = Path(path)
        self._slot = self._claim()
        self._connections = 0
        self._closing = 0  # connections told to close whose response has not ended
        self._last_shed = 0.0
        self._live: list[int] = []
        self._live_checked = -math.inf

    @staticmethod
    def create() -> Path:
        """A new empty board (the supervisor's): a private temporary file the workers open by path."""
        fd, name = tempfile.mkstemp(prefix="xdlabel-serve-", suffix=".connections")
        with os.fdopen(fd, "wb") as file:
            file.write(bytes(SLOTS * 16))
        return Path(name)

    def _claim(self) -> int:
        """The first free row, or the row of a process that is gone (a worker killed and replaced)."""
        with open(self._path, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two workers starting at once must not take one row
            for slot in range(SLOTS):
                pid = int(self._rows[slot, 0])
                if pid == 0 or not _alive(pid):
                    self._rows[slot] = (os.getpid(), 0)
                    return slot
        raise RuntimeError(f"more than {SLOTS} worker processes on one connection board")

    def connections_changed(self, connections: int) -> None:
        self._connections = connections
        self._publish()

    def _publish(self) -> None:
        self._rows[self._slot, 1] = self._connections - self._closing

    def should_shed(self) -> bool:
        """Whether this worker holds more than its even share (rounded up) plus one."""
        now = time.monotonic()
        if now - self._last_shed < SHED_INTERVAL:
            return False
        mine = self._connections - self._closing
        live = self._live_slots(now)
        share = math.ceil(int(self._rows[live, 1].clip(0).sum()) / len(live))
        if mine <= share + 1:
            return False
        self._last_shed = now
        return True

    def _live_slots(self, now: float) -> list[int]:
        """The rows of processes that are alive, looked up at most every ``LIVENESS_INTERVAL``
        seconds (a killed worker's row keeps its last count until its replacement claims it)."""
        if now - self._live_checked > LIVENESS_INTERVAL:
            pids = self._rows[:, 0]
            self._live = [int(slot) for slot in np.flatnonzero(pids)
                          if slot == self._slot or _alive(int(pids[slot]))]
            self._live_checked = now
        return self._live

    def closing(self, delta: int) -> None:
        self._closing += delta
        self._publish()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie its supervisor has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process
            return True
        return True


_board: ConnectionBoard | None = None


def board() -> ConnectionBoard | None:
    """This process's board, opened (its row claimed) at first use; None outside a multi-worker
    server. A worker opens it as it starts, so its siblings count it before its first connection."""
    global _board
    if _board is None and os.environ.get(CONNECTION_BOARD_VARIABLE):
        _board = ConnectionBoard(os.environ[CONNECTION_BOARD_VARIABLE])
    return _board


class CountingProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    """uvicorn's HTTP protocol, publishing the worker's connection count as connections come and go."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # The workers' sockets come from uvicorn's shared listening socket, made without naming TCP,
        # so asyncio does not turn Nagle off on them as it does on its own: a response written in two
        # parts (head, body) then waited out the client's delayed ACK, ~40 ms on every request.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if (shared := board()) is not None:
            shared.connections_changed(len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if (shared := board()) is not None:
            shared.connections_changed(len(self.connections))


class SpreadConnections:
    """Answers a request with ``Connection: close`` when this worker holds more than its share."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shared = board()
        if scope["type"] != "http" or shared is None or not shared.should_shed():
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        shared.closing(+1)
        try:
            await self.app(scope, receive, closing)
        finally:  # the server closes the connection once this response has ended
            shared.closing(-1)

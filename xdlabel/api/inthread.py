"""xdlabel's HTTP app under a real uvicorn server on a free local port, in a thread (tests, benches)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from xdlabel.api.app import create_app
from xdlabel.services import Services


class ThreadedServer:
    """``with ThreadedServer(services) as url:`` serves ``services`` at ``url`` until the block ends."""

    def __init__(self, services: Services) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(services=services), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

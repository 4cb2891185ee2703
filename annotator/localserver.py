"""Run a real Label Studio on 127.0.0.1 from its own virtualenv (tests, benchmarks, local trials).

Label Studio pins Django, DRF, pytz, redis and more, so it never shares xdlabel's environment; it
talks to xdlabel over HTTP only. The admin user and a legacy API token are fixed at first start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
# Variables Label Studio also reads without its prefix (USERNAME, PORT...): a CI environment that
# sets them would change the server.
_STRAY = ("USERNAME", "PASSWORD", "PORT", "HOST", "DEBUG", "LOG_LEVEL", "USER_TOKEN")


def ensure_virtualenv(path: Path, python: str = sys.executable) -> Path:
    """The ``label-studio`` executable of a virtualenv at ``path``, installed there if missing."""
    exe = path / "bin" / "label-studio"
    if not exe.exists():
        subprocess.run([python, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", f"label-studio=={LABEL_STUDIO_VERSION}"],
                       check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalLabelStudio:
    executable: Path
    data_dir: Path
    port: int = field(default_factory=free_port)
    user: str = "admin@example.com"
    password: str = "xdlabel-admin-12345"
    token: str = "xdlabel-legacy-token-0123456789abcdef"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def files_root(self) -> Path:
        """LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: local-files storages must lie under it."""
        return self.data_dir / "files"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in _STRAY and not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "XDLABEL_"))}
        prefix = "LABEL_STUDIO_"
        env.update({
            prefix + "BASE_DATA_DIR": str(self.data_dir),  # --data-dir alone is applied too late
            prefix + "USERNAME": self.user, prefix + "PASSWORD": self.password,
            prefix + "USER_TOKEN": self.token, prefix + "ENABLE_LEGACY_API_TOKEN": "true",
            prefix + "DISABLE_SIGNUP_WITHOUT_LINK": "true",
            prefix + "LOCAL_FILES_SERVING_ENABLED": "true", prefix + "LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
            prefix + "ML_BLOCK_LOCAL_IP": "false",  # the ML backend runs on loopback
            prefix + "SSRF_PROTECTION_ENABLED": "false",  # so do the webhooks
            prefix + "HOST": self.url,  # what /setup tells an ML backend to read files from
            prefix + "COLLECT_ANALYTICS": "false", prefix + "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        })
        return env

    def start(self, timeout: float = 180.0) -> None:
        self.files_root.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--log-level", "WARNING"],
            env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}; see "
                                   f"{self.data_dir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Label Studio did not answer /health within {timeout:.0f} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM stops it cleanly; SIGKILL is a crash."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

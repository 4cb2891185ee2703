from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio, ensure_virtualenv
from xdlabel.api.inthread import ThreadedServer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"

# Largest error of each golden output, filled by the parity tests, printed at the end of the run.
PARITY_ERRORS: dict[str, float] = {}


def relative_error(actual: object, expected: object) -> float:
    """max |actual - expected| / max |expected|: the per-output measure the README reports."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != golden {e.shape}"
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(PARITY / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_meta() -> dict[str, object]:
    return json.loads((PARITY / "golden_meta.json").read_text())


@pytest.fixture(scope="session")
def parity_model():  # type: ignore[no-untyped-def]
    from xdecoder import build_model, load_checkpoint

    torch.manual_seed(0)
    model = build_model("parity")
    load_checkpoint(model, PARITY / "reduced_weights.safetensors")
    return model


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    from tests.test_faults import FAULT_LOG

    if FAULT_LOG:
        terminalreporter.section(f"fault injection: {len(FAULT_LOG)} trials passed, with what each injected")
        for line in FAULT_LOG:
            terminalreporter.write_line(line)
    if not PARITY_ERRORS:
        return
    terminalreporter.section("X-Decoder parity: largest relative error per golden output (goal <= 1e-4)")
    for name, err in sorted(PARITY_ERRORS.items()):
        terminalreporter.write_line(f"{name:<48} {err:.2e}")


# -- databases: every SQL test runs on SQLite and on PostgreSQL ------------------------------------

POSTGRES_ADMIN_URL = os.environ.get("XDLABEL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_database() -> Iterator[str]:
    """A fresh database on the local server for this test run, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"xdlabel_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # noqa: BLE001 - any connection failure means no server
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {err}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no tables yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'xdlabel.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database."""
    yield from _postgres_database()


@pytest.fixture
def migrated_url(database_url: str) -> str:
    from index.db import upgrade

    upgrade(database_url)
    return database_url


# -- real servers: xdlabel under uvicorn, Label Studio from its own virtualenv ----------------------

def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (160, 120), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(10, 90, 2))
        draw.ellipse([x, y, x + 40, y + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


Server = ThreadedServer  # the name the tests use




@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLabelStudio]:
    """A real Label Studio on 127.0.0.1 (installed into .venv-labelstudio on first use: ~1 min)."""
    venv = Path(os.environ.get("XDLABEL_TEST_LS_VENV", REPO / ".venv-labelstudio"))
    server = LocalLabelStudio(ensure_virtualenv(venv), tmp_path_factory.mktemp("label-studio"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ls_client(label_studio: LocalLabelStudio) -> LabelStudioClient:
    """A client of the session's Label Studio, with its token."""
    return LabelStudioClient(label_studio.url, label_studio.token)

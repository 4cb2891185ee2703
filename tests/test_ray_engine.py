"""`xdlabel ingest --engine ray` on a local Ray instance writes what the local engine writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sqlalchemy import select

from index.db import make_engine, make_session_factory
from index.models import Embedding, Image
from index.store import from_bytes
from tests.test_api import make_images


def ingest(folder: Path, data: Path, engine: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_SHORT_SIDE": "96", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "xdlabel.cli", "ingest", str(folder), "--dataset", "r",
                           "--engine", engine, "--batch-size", "2", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)


def vectors(data: Path) -> dict[str, np.ndarray]:
    engine = make_engine(f"sqlite:///{data / 'xdlabel.db'}")
    with make_session_factory(engine)() as s:
        rows = s.execute(select(Image.sha256, Embedding.vector).join(Embedding, Embedding.image_id == Image.id)
                         .where(Embedding.kind == "image")).all()
    engine.dispose()
    return {sha: from_bytes(v) for sha, v in rows}


def test_ray_engine_matches_the_local_engine(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "photos", 5)
    (tmp_path / "photos" / "copy.png").write_bytes(paths[0].read_bytes())  # a duplicate
    (tmp_path / "photos" / "broken.png").write_bytes(b"broken")
    local, ray = tmp_path / "local", tmp_path / "ray"
    r = ingest(tmp_path / "photos", local, "local")
    assert r.returncode == 0, r.stderr
    r = ingest(tmp_path / "photos", ray, "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"added": 5' in r.stdout and '"duplicates": 1' in r.stdout and "broken.png" in r.stdout
    a, b = vectors(local), vectors(ray)
    assert set(a) == set(b) and len(a) == 5
    for sha in a:
        np.testing.assert_allclose(a[sha], b[sha], atol=1e-5)
    again = ingest(tmp_path / "photos", ray, "ray")  # resumable: nothing new
    assert '"added": 0' in again.stdout and '"duplicates": 7' in again.stdout, again.stdout

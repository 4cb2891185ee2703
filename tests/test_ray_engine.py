"""`xdlabel ingest --engine ray` on a local Ray instance writes what the local engine writes, and
identical files (in one batch, or in two actors' batches) are stored once."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from index.db import make_engine, make_session_factory
from index.models import Embedding, Image
from index.store import from_bytes
from tests.test_api import make_images
from xdlabel.ingest import IngestPipeline
from xdlabel.ray_engine import InferActor
from xdlabel.services import Services
from xdlabel.settings import Settings


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
    (tmp_path / "photos" / "img4b.png").write_bytes(paths[4].read_bytes())  # one in img4's batch
    (tmp_path / "photos" / "broken.png").write_bytes(b"broken")
    local, ray = tmp_path / "local", tmp_path / "ray"
    r = ingest(tmp_path / "photos", local, "local")
    assert r.returncode == 0, r.stderr
    r = ingest(tmp_path / "photos", ray, "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"added": 5' in r.stdout and '"duplicates": 2' in r.stdout and "broken.png" in r.stdout
    a, b = vectors(local), vectors(ray)
    assert set(a) == set(b) and len(a) == 5
    for sha in a:
        np.testing.assert_allclose(a[sha], b[sha], atol=1e-5)
    again = ingest(tmp_path / "photos", ray, "ray")  # resumable: nothing new
    assert '"added": 0' in again.stdout and '"duplicates": 8' in again.stdout, again.stdout


@pytest.mark.parametrize("actors", [1, 2])
def test_identical_files_in_actor_batches_are_stored_once(migrated_url: str, tmp_path: Path, actors: int) -> None:
    """The Ray actors' work without a Ray cluster: each actor (1, or 2 given the same batch, as two
    actors of a cluster may be) turns a batch holding the same file twice into model output, and
    the driver writes every result through the pipeline: one image, one image vector."""
    path = make_images(tmp_path / "photos", 1)[0]
    (tmp_path / "photos" / "same.png").write_bytes(path.read_bytes())
    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64, caption_steps=2)
    services = Services(settings)
    pipeline = IngestPipeline(services, "ray")
    known = pipeline.prepare()
    rows = {"uri": np.array([path.as_uri(), (tmp_path / "photos" / "same.png").as_uri()], dtype=object),
            "meta": np.array([pickle.dumps({}), pickle.dumps({})], dtype=object)}
    for _ in range(actors):
        actor = InferActor(settings.model_dump_json(), known, pipeline.retry_keys)
        batch, duplicates = pickle.loads(actor(rows)["payload"][0])
        assert len(batch.decoded) == 2 and not duplicates  # both reach the writer, as they would on Ray
        pipeline.write(batch)
    assert len(pipeline.report.added) == 1 and len(pipeline.report.duplicates) == 2 * actors - 1
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 1
        assert s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image")) == 1
    services.engine.dispose()

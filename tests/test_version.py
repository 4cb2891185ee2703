"""A model version names everything that decides a vector: config, weights and preprocessing.

Real parts: the parity model, the ingest pipeline, SQLite and PostgreSQL, FAISS indexes on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from index.models import Embedding, ModelVersion
from index.repository import get_or_create_model_version
from tests.test_api import make_images
from xdecoder.checkpoint import file_sha256, resolve
from xdlabel.ingest import IngestPipeline
from xdlabel.services import Services, version_name
from xdlabel.settings import Settings
from xdlabel.sources import Item


def test_changing_the_short_side_makes_a_new_version_and_vectors_never_mix(
        migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XDLABEL_SHORT_SIDE 64, then 96, over the same database and data folder: two versions of one checkpoint,
    each recording its preprocessing; each version's index answers only with its own vectors (a random query,
    k = every vector there is); a row registered before preprocessing was recorded stays readable and unused."""
    photos = make_images(tmp_path / "photos", 3)
    monkeypatch.setenv("XDLABEL_CAPTION_STEPS", "2")
    versions: dict[int, tuple[int, str]] = {}
    for short_side in (64, 96):
        monkeypatch.setenv("XDLABEL_SHORT_SIDE", str(short_side))
        services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url))
        if short_side == 64:  # a version registered the old way: name without a preprocessing key
            with services.sessions() as session:
                sha = file_sha256(resolve(services.settings.checkpoint))
                legacy = get_or_create_model_version(session, name=version_name(services.settings.model, sha),
                                                     checkpoint_sha256=sha, embedding_dim=1)
                session.commit()
                legacy_id = legacy.id
        name = services.model_version_name
        report = IngestPipeline(services, f"side {short_side}").run([Item(p.resolve().as_uri()) for p in photos])
        assert len(report.added) == len(photos)
        assert services.model.name == name and services.predictor.version == name
        versions[short_side] = (services.model.version_id, name)
        services.close()
    (a, name_a), (b, name_b) = versions[64], versions[96]
    assert a != b and name_a != name_b and legacy_id not in (a, b)
    assert name_a.rsplit("-", 1)[0] == name_b.rsplit("-", 1)[0]  # same config and weights
    services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url))
    with services.sessions() as session:
        rows = {v.id: v.preprocessing for v in session.scalars(select(ModelVersion))}
        assert (rows[a] or {}).get("short_side") == 64 and (rows[b] or {}).get("short_side") == 96
        assert (rows[a] or {}).get("dtype") == "float32"
        assert rows[legacy_id] is None
        owners = {e.id: e.model_version_id for e in session.scalars(select(Embedding))}
    rng = np.random.default_rng(0)
    for version in (a, b):
        for kind, dim in (("image", 2 * services.predictor.model.config.dim_proj),
                          ("region", services.predictor.model.config.dim_proj)):
            mine = {i for i, v in owners.items() if v == version}
            hits = services.store.search(version, kind, rng.normal(size=(1, dim)).astype(np.float32),
                                         k=len(owners))[0]
            assert {h.embedding_id for h in hits} <= mine, (version, kind)
            if kind == "image":
                assert len(hits) == len(photos)
    services.close()

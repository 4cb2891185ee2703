"""What ingest stores per image (--outputs, XDLABEL_INGEST_OUTPUTS, a job's outputs): the outputs not
named are neither computed nor stored, image search still works, and bad names are refused with the
reason on the command line and over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from index.models import Embedding, Prediction
from index.models import Image as ImageRow
from tests.conftest import Server, make_images
from tests.videoclips import still_clip
from xdlabel import jobs
from xdlabel.api.auth import create_api_key
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import folder_items
from xdlabel.video import Sampling
from xdlabel.video_ingest import VideoPipeline

FAST = {"XDLABEL_SHORT_SIDE": "64", "XDLABEL_CAPTION_STEPS": "2"}


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdlabel.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def stored(services: Services, dataset_images: list[int]) -> dict[str, int]:
    """Rows of what the ingest stored for these images."""
    with services.sessions() as s:
        def count(kind: str) -> int:
            return int(s.scalar(select(func.count()).select_from(Embedding).where(
                Embedding.kind == kind, Embedding.image_id.in_(dataset_images))) or 0)
        captions = s.scalar(select(func.count()).select_from(Prediction).where(
            Prediction.task == "caption", Prediction.image_id.in_(dataset_images)))
        texts = s.scalar(select(func.count()).select_from(ImageRow).where(
            ImageRow.caption.is_not(None), ImageRow.id.in_(dataset_images)))
    return {"image": count("image"), "region": count("region"), "caption rows": int(captions or 0),
            "caption texts": int(texts or 0)}


def counting(services: Services) -> dict[str, int]:
    """Counts the predictor's region and caption calls (the real methods still run)."""
    calls = {"region_embeddings": 0, "caption": 0}
    predictor = services.predictor

    def wrap(name: str) -> None:
        real: Callable[..., Any] = getattr(predictor, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)
        setattr(predictor, name, counted)

    for name in calls:
        wrap(name)
    return calls


def test_cli_outputs_embedding_only_then_regions_and_bad_names(tmp_path: Path) -> None:
    env = {**os.environ, **FAST, "XDLABEL_DATA_DIR": str(tmp_path / "data")}
    make_images(tmp_path / "photos", 3)
    r = cli(["ingest", str(tmp_path / "photos"), "--dataset", "plain", "--outputs", "embedding", "--json"], env)
    assert r.returncode == 0, r.stderr
    plain = json.loads(r.stdout)["added"]
    r = cli(["ingest", str(tmp_path / "photos"), "--dataset", "regions", "--outputs", "embedding,regions",
             "--json"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] == plain == 3
    r = cli(["search", "a circle", "-k", "3", "--json"], env)  # image search reads the image vectors
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 3
    services = Services(Settings(data_dir=tmp_path / "data", short_side=64))
    with services.sessions() as s:
        ids = {name: list(s.scalars(select(ImageRow.id).join(ImageRow.dataset).where(
            ImageRow.dataset.has(name=name)))) for name in ("plain", "regions")}
    assert stored(services, ids["plain"]) == {"image": 3, "region": 0, "caption rows": 0, "caption texts": 0}
    with_regions = stored(services, ids["regions"])
    assert with_regions["region"] > 0 and with_regions["caption rows"] == with_regions["caption texts"] == 0
    services.close()
    for bad, reason in ((["--outputs", "embedding,bogus"], "unknown outputs bogus; choose from embedding, regions"),
                        (["--outputs", "regions,caption"], "outputs must include embedding"),
                        (["--outputs", ""], "outputs must include embedding")):
        r = cli(["ingest", str(tmp_path / "photos"), "--dataset", "x", *bad], env)
        assert r.returncode == 2 and reason in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    r = cli(["ingest", str(tmp_path / "photos"), "--dataset", "x"],
            {**env, "XDLABEL_INGEST_OUTPUTS": "embedding,colour"})
    assert r.returncode == 2 and "XDLABEL_INGEST_OUTPUTS" in r.stderr and "unknown outputs colour" in r.stderr


def test_a_job_over_http_stores_only_its_outputs_and_bad_outputs_are_422(migrated_url: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 3)
    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64, caption_steps=2,
                        source_roots=[photos])
    services = Services(settings)
    calls = counting(services)
    with services.sessions() as s:
        key = create_api_key(s, "tests")
    with Server(services) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        for outputs, reason in ((["caption"], "outputs must include embedding"),
                                (["embedding", "colour"], "embedding"), ([], "outputs")):
            r = client.post("/v1/jobs", json={"dataset": "d", "sources": [str(photos)], "outputs": outputs})
            assert r.status_code == 422 and reason in r.json()["error"]["message"], (outputs, r.text)
        r = client.post("/v1/jobs", json={"dataset": "d", "sources": [str(photos)],
                                          "outputs": ["embedding", "regions", "regions"]})
        assert r.status_code == 201 and r.json()["params"]["outputs"] == ["embedding", "regions"], r.text
    with services.sessions() as s:
        job = jobs.claim(s, "me")
    assert job is not None and jobs.run(services, job) == "done"
    with services.sessions() as s:
        ids = list(s.scalars(select(ImageRow.id)))
    made = stored(services, ids)
    assert made["image"] == 3 and made["region"] > 0 and made["caption rows"] == made["caption texts"] == 0
    assert calls["caption"] == 0 and calls["region_embeddings"] > 0  # the caption's work was skipped


def test_video_frames_store_only_the_outputs_asked_for(migrated_url: str, tmp_path: Path) -> None:
    services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64,
                                 caption_steps=2, ingest_outputs="embedding,caption"))
    calls = counting(services)
    still_clip(tmp_path / "clips" / "a.mp4", "triangle", "yellow", seconds=2.0)
    report = VideoPipeline(services, "v", sampling=Sampling(fps=2)).run(list(folder_items(tmp_path / "clips")))
    assert len(report.added) == 4 and not report.failed
    made = stored(services, report.added)
    assert made == {"image": 4, "region": 0, "caption rows": 4, "caption texts": 4}  # the settings' default
    assert calls["region_embeddings"] == 0 and calls["caption"] > 0
    report = VideoPipeline(services, "w", sampling=Sampling(fps=2), outputs=["embedding"]).run(
        list(folder_items(tmp_path / "clips")))
    assert stored(services, report.added) == {"image": 4, "region": 0, "caption rows": 0, "caption texts": 0}
    services.close()

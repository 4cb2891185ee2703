"""The HTTP API against a real uvicorn server, on SQLite and PostgreSQL.

The model is the bundled one (the default): the tests check what the API does with its outputs,
not search quality.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from annotator.convert import coco_rle_to_mask
from tests.conftest import PARITY, Server, make_images
from xdlabel.api.auth import create_api_key
from xdlabel.ingest import ingest_files
from xdlabel.services import Services
from xdlabel.settings import Settings


@pytest.fixture
def api(migrated_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=128)
    services = Services(settings)
    paths = make_images(tmp_path / "photos", 6)
    report_a = ingest_files(services, "alpha", paths[:4], tags=["outdoor"])
    report_b = ingest_files(services, "beta", paths[4:] + [PARITY / "imageA_320x480.png"])
    with services.sessions() as session:
        key = create_api_key(session, "tests")
        read_only = create_api_key(session, "reader", scopes=["read"])
    with Server(services) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        yield {"client": client, "url": url, "services": services, "key": key, "read_only": read_only,
               "alpha": report_a.added, "beta": report_b.added, "paths": paths}
    services.engine.dispose()


def test_health_needs_no_key_and_v1_does(api) -> None:  # type: ignore[no-untyped-def]
    anonymous = httpx.Client(base_url=api["url"])
    assert anonymous.get("/health").json() == {"status": "ok"}
    r = anonymous.post("/v1/search/text", json={"query": "a dog"})
    assert r.status_code == 401 and "X-API-Key" in r.json()["error"]["message"]
    r = anonymous.post("/v1/search/text", json={"query": "a dog"}, headers={"X-API-Key": "nope"})
    assert r.status_code == 401
    ready = api["client"].get("/ready").json()
    assert ready["status"] == "ready" and ready["model"].startswith("parity-")


def test_text_search_scores_are_the_model_retrieval_scores(api) -> None:  # type: ignore[no-untyped-def]
    client, services = api["client"], api["services"]
    r = client.post("/v1/search/text", json={"query": "a red circle", "k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # Recompute the top hit's score from the image itself: official 0.5/0.5 ensemble.
    top = hits[0]
    path = Path(top["uri"].removeprefix("file://"))
    predictor = services.predictor
    expected = predictor.image_embeddings(predictor.encode(Image.open(path))) @ \
        predictor.text_query_embeddings(["a red circle"]).T
    assert top["score"] == pytest.approx(float(expected[0, 0]), abs=1e-4)
    # negative text: score(query) - 0.5 * score(negative), exactly
    def scores(**body: object) -> dict[int, float]:
        hits = client.post("/v1/search/text", json={"k": 7, **body}).json()["hits"]
        return {h["image_id"]: h["score"] for h in hits}

    plain, neg = scores(query="a red circle"), scores(query="a cat")
    both = client.post("/v1/search/text", json={"query": "a red circle", "negative": "a cat", "k": 7}).json()["hits"]
    for h in both:
        assert h["score"] == pytest.approx(plain[h["image_id"]] - 0.5 * neg[h["image_id"]], abs=1e-4)


def test_filters_and_paging(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    datasets = {d["name"]: d for d in client.get("/v1/datasets").json()}
    assert datasets["alpha"]["image_count"] == 4 and datasets["beta"]["image_count"] == 3
    only_alpha = client.post("/v1/search/text", json={
        "query": "a shape", "k": 10, "filters": {"dataset_ids": [datasets["alpha"]["id"]]}}).json()["hits"]
    assert sorted(h["image_id"] for h in only_alpha) == sorted(api["alpha"])
    tagged = client.post("/v1/search/text", json={"query": "x", "k": 10, "filters": {"tags": ["outdoor"]}}).json()
    assert {h["image_id"] for h in tagged["hits"]} == set(api["alpha"])
    page1 = client.post("/v1/search/text", json={"query": "x", "k": 3}).json()
    page2 = client.post("/v1/search/text", json={"query": "x", "k": 3, "offset": page1["next_offset"]}).json()
    every = client.post("/v1/search/text", json={"query": "x", "k": 6}).json()
    assert [h["image_id"] for h in page1["hits"] + page2["hits"]] == [h["image_id"] for h in every["hits"]]


def test_image_search_by_id_and_upload(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    target = api["alpha"][1]
    hits = client.post("/v1/search/image", data={"image_id": target, "k": 3}).json()["hits"]
    assert hits[0]["image_id"] == target and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    with open(api["paths"][1], "rb") as f:
        r = client.post("/v1/search/image", files={"file": ("x.png", f, "image/png")}, data={"k": "2"})
    hits = r.json()["hits"]
    assert hits[0]["image_id"] == target
    r = client.post("/v1/search/image", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]["message"]
    assert client.post("/v1/search/image", data={"image_id": 999999}).status_code == 404
    assert client.post("/v1/search/image", data={"k": 3}).status_code == 400


def test_region_search_returns_boxes_and_masks(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    hits = client.post("/v1/search/regions", json={"query": "a circle", "k": 5}).json()["hits"]
    assert hits, "the ingested images produced no regions"
    for h in hits:
        mask = coco_rle_to_mask(h["mask_rle"])
        ys, xs = np.nonzero(mask)
        assert h["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        image = client.get(f"/v1/images/{h['image_id']}").json()
        assert mask.shape == (image["height"], image["width"])


def test_image_endpoints(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    image_id = api["beta"][-1]
    meta = client.get(f"/v1/images/{image_id}").json()
    assert (meta["width"], meta["height"]) == (480, 320) and meta["status"] == "done"
    thumb = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 64})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    assert client.get(f"/v1/images/{image_id}/original").content == (PARITY / "imageA_320x480.png").read_bytes()
    predictions = client.get(f"/v1/images/{image_id}/predictions").json()
    assert predictions[0]["task"] == "caption" and predictions[0]["payload"]["text"] == meta["caption"]
    assert client.get("/v1/images/424242").json() == {"error": {"status": 404, "message": "image 424242 not found"}}
    models = client.get("/v1/models").json()
    assert len(models) == 1 and models[0]["embedding_dim"] == 64


def test_errors_are_json_with_the_right_status(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    r = client.post("/v1/search/text", json={"query": ""})
    assert r.status_code == 422 and "query" in r.json()["error"]["message"]
    r = client.post("/v1/search/text", json={"query": "x", "k": 0})
    assert r.status_code == 422
    r = client.post("/v1/search/text", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text
    big = b"\x89PNG" + b"0" * (21 * 1024 * 1024)
    r = client.post("/v1/search/image", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413
    reader = httpx.Client(base_url=api["url"], headers={"X-API-Key": api["read_only"]})
    r = reader.post("/v1/datasets", json={"name": "gamma"})
    assert r.status_code == 403 and "write" in r.json()["error"]["message"]


def test_dataset_lifecycle_removes_images_and_vectors(api) -> None:  # type: ignore[no-untyped-def]
    client = api["client"]
    created = client.post("/v1/datasets", json={"name": "gamma"})
    assert created.status_code == 201
    assert client.post("/v1/datasets", json={"name": "gamma"}).status_code == 409
    alpha = next(d for d in client.get("/v1/datasets").json() if d["name"] == "alpha")
    assert client.delete(f"/v1/datasets/{alpha['id']}").status_code == 204
    hits = client.post("/v1/search/text", json={"query": "x", "k": 20}).json()["hits"]
    assert not set(api["alpha"]) & {h["image_id"] for h in hits}
    assert client.get(f"/v1/images/{api['alpha'][0]}").status_code == 404
    assert client.delete(f"/v1/datasets/{alpha['id']}").status_code == 404


def test_openapi_documents_the_api(api) -> None:  # type: ignore[no-untyped-def]
    spec = api["client"].get("/openapi.json").json()
    assert {"/v1/search/text", "/v1/search/image", "/v1/search/regions", "/v1/datasets",
            "/v1/images/{image_id}/thumbnail", "/v1/models", "/health"} <= set(spec["paths"])


def test_dead_database_gives_503(tmp_path: Path) -> None:
    """Nothing listens on port 1: the API answers 503 with a message, /health still 200."""
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        require_api_key=False)
    services = Services(settings)
    with Server(services) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/v1/datasets")
        assert r.status_code == 503 and "database" in r.json()["error"]["message"]
        r = client.get("/ready")
        assert r.status_code == 503
    services.engine.dispose()

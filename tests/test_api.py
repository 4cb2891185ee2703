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
from index.models import Image as ImageRow
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
        by_file = {Path(im.uri).name: im.id for im in session.query(ImageRow)}  # ingest order is not id order
    with Server(services) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        yield {"client": client, "url": url, "services": services, "key": key, "read_only": read_only,
               "alpha": report_a.added, "beta": report_b.added, "paths": paths, "by_file": by_file}
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
    with services.sessions() as session:
        stored = session.get(ImageRow, top["image_id"])
        path = Path(stored.uri.removeprefix("file://"))
    assert top["uri"] == path.name  # no root configured: the file name, never the server's path
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
    with api["services"].sessions() as session:
        path = Path(session.get(ImageRow, target).uri.removeprefix("file://"))
    r = client.post("/v1/search/image", files={"file": ("x.png", path.read_bytes(), "image/png")}, data={"k": "2"})
    hits = r.json()["hits"]
    assert hits[0]["image_id"] == target
    r = client.post("/v1/search/image", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]["message"]
    assert "0x" not in r.text  # no Python reprs (<_io.BytesIO object at 0x...>)
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
    image_id = api["by_file"]["imageA_320x480.png"]
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
    assert r.status_code == 413 and str(20 * 2**20 + 64 * 1024) in r.json()["error"]["message"]  # 20 MiB + framing
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


def test_ids_beyond_64_bits_filters_and_nul_are_4xx(api) -> None:  # type: ignore[no-untyped-def]
    """Inputs that once gave 500: ids past 2^63-1 in paths, forms and dataset_ids; a `filters` form
    field that is not a JSON object; NUL characters (PostgreSQL refuses them in text)."""
    client = api["client"]
    big = 2**63
    for path in (f"/v1/images/{big}", f"/v1/images/{big}/original", f"/v1/images/{big}/thumbnail",
                 f"/v1/jobs/{big}", f"/v1/images/{big * 2**64}/regions"):
        r = client.get(path)
        assert r.status_code == 422, (path, r.text)
    assert client.get(f"/v1/images/{big - 1}").status_code == 404
    assert client.delete(f"/v1/datasets/{big}").status_code == 422
    r = client.post("/v1/search/text", json={"query": "x", "filters": {"dataset_ids": [big]}})
    assert r.status_code == 422 and "dataset_ids" in r.json()["error"]["message"]
    r = client.post("/v1/search/text", json={"query": "x", "filters": {"dataset_ids": [big - 1]}})
    assert r.status_code == 200 and r.json()["hits"] == []
    assert client.post("/v1/search/image", data={"image_id": str(big)}).status_code == 422
    for raw in ("[]", "1", '"x"', "{not json", "null", '{"tags": "a"}', '{"unknown": 1}'):
        r = client.post("/v1/search/image", data={"image_id": str(api["alpha"][0]), "filters": raw})
        assert r.status_code == 422 and "filters" in r.json()["error"]["message"], (raw, r.text)
    for body in ({"query": "a\x00b"}, {"query": "x", "filters": {"tags": ["\x00"]}},
                 {"query": "x", "filters": {"meta": {"k": "\x00"}}}):
        r = client.post("/v1/search/text", json=body)
        assert r.status_code == 422 and "NUL" in r.json()["error"]["message"], r.text
    assert client.post("/v1/datasets", json={"name": "a\x00"}).status_code == 422
    r = client.post("/v1/search/text", json={"query": "x", "filters": {"meta": {'a"b': 1}}})
    assert r.status_code == 422  # a key that would break a JSON path


def test_typed_meta_filters_and_offsets_agree_with_python(api) -> None:  # type: ignore[no-untyped-def]
    """Rows hold 1, 1.0, "1", true, "abc", null, a list or nothing under the same key; every typed
    filter must match exactly the rows Python's type-aware equality picks, on SQLite and PostgreSQL
    alike (PostgreSQL once raised casting "abc" to float). Timestamps come back with an offset, and a
    +05:00 created_after is compared as the instant it names."""
    from datetime import UTC, datetime, timedelta, timezone

    client, services = api["client"], api["services"]
    ids = api["alpha"] + api["beta"]
    values: list[object] = [1, 1.0, "1", True, "abc", None, [1], "missing"]
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    with services.sessions() as session:
        for k, image_id in enumerate(ids):
            row = session.get(ImageRow, image_id)
            row.meta = {} if values[k] == "missing" else {"n": values[k]}
            row.created_at = start + timedelta(hours=k)
        session.commit()
    stored = {i: client.get(f"/v1/images/{i}").json() for i in ids}

    def same(a: object, b: object) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return isinstance(a, bool) and isinstance(b, bool) and a == b
        if isinstance(a, int | float) and isinstance(b, int | float):
            return float(a) == float(b)
        return type(a) is type(b) and a == b

    for probe in (1, 1.0, "1", True, False, "abc", 2):
        r = client.post("/v1/search/text", json={"query": "x", "k": 20, "filters": {"meta": {"n": probe}}})
        assert r.status_code == 200, r.text
        expected = {i for i in ids if "n" in stored[i]["meta"] and same(stored[i]["meta"]["n"], probe)}
        assert {h["image_id"] for h in r.json()["hits"]} == expected, probe
    for image in stored.values():
        assert datetime.fromisoformat(image["created_at"]).utcoffset() == timedelta(0)
    plus5 = datetime(2026, 6, 1, 15, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=5)))
    assert plus5.isoformat() == "2026-06-01T20:30:00+05:00"  # read naively as UTC it would exclude every row
    r = client.post("/v1/search/text", json={"query": "x", "k": 20,
                                             "filters": {"created_after": plus5.isoformat()}})
    expected = {i for i in ids if datetime.fromisoformat(stored[i]["created_at"]) >= plus5}
    assert expected and expected != set(ids)
    assert {h["image_id"] for h in r.json()["hits"]} == expected
    r = client.post("/v1/search/text", json={"query": "x", "filters": {"created_after": "2026-06-01T12:00:00"}})
    assert r.status_code == 422 and "timezone" in r.json()["error"]["message"]


def test_ready_keys_and_cors(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """/ready says only ready without a key, the model and dialect with one, never where the database
    is; keys are listed without hashes and revoked at once; CORS headers only when configured."""
    client, services = api["client"], api["services"]
    anonymous = httpx.Client(base_url=api["url"])
    assert anonymous.get("/ready").json() == {"status": "ready"}
    detailed = client.get("/ready").json()
    assert detailed["model"].startswith("parity-") and detailed["database"] in ("sqlite", "postgresql")
    url = services.engine.url
    for secret in filter(None, (url.host, str(url.port) if url.port else None, url.database)):
        assert secret not in anonymous.get("/ready").text and secret not in client.get("/ready").text
    reader = httpx.Client(base_url=api["url"], headers={"X-API-Key": api["read_only"]})
    assert reader.get("/v1/keys").status_code == 403
    listed = client.get("/v1/keys").json()
    assert {k["name"] for k in listed} == {"tests", "reader"}
    assert all(set(k) == {"id", "name", "scopes", "created_at", "revoked_at"} for k in listed)
    assert api["key"] not in client.get("/v1/keys").text
    reader_id = next(k["id"] for k in listed if k["name"] == "reader")
    assert reader.get("/v1/datasets").status_code == 200
    assert client.delete(f"/v1/keys/{reader_id}").status_code == 204
    assert reader.get("/v1/datasets").status_code == 401
    assert next(k for k in client.get("/v1/keys").json() if k["id"] == reader_id)["revoked_at"]
    assert client.delete("/v1/keys/999999").status_code == 404
    origin = {"Origin": "http://127.0.0.1:9", "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "x-api-key"}
    r = client.options("/v1/search/text", headers=origin)
    assert "access-control-allow-origin" not in r.headers  # off by default
    settings = Settings(data_dir=tmp_path / "cors", database_url=str(services.engine.url.render_as_string(False)),
                        allowed_origins=["http://127.0.0.1:9"])
    other = Services(settings)
    with Server(other) as url, httpx.Client(base_url=url) as c:
        r = c.options("/v1/search/text", headers=origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:9"
        r = c.options("/v1/search/text", headers={**origin, "Origin": "http://127.0.0.2:9"})
        assert "access-control-allow-origin" not in r.headers
    other.engine.dispose()


def test_originals_only_of_images_that_decoded(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A failed image's file, a done image whose file was replaced (by text, by a PNG declaring
    12000x12000) or deleted: original and thumbnail answer 4xx with a reason, never the bytes, never 500."""
    import struct
    import zlib

    client, services = api["client"], api["services"]
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:TOPSECRET\n")
    with services.sessions() as session:
        failed = ImageRow(dataset_id=session.get(ImageRow, api["alpha"][0]).dataset_id, uri=secret.as_uri(),
                          sha256="0" * 64, status="failed", error=f"not a readable image: {secret}")
        session.add(failed)
        session.commit()
        failed_id = failed.id
    for suffix in ("original", "thumbnail"):
        r = client.get(f"/v1/images/{failed_id}/{suffix}")
        assert r.status_code == 404 and "TOPSECRET" not in r.text
    shown = client.get(f"/v1/images/{failed_id}").json()
    assert str(tmp_path) not in shown["uri"] + shown["error"] and shown["uri"] == "secret.txt"
    # a done image whose file now holds text
    victim = api["alpha"][2]
    with services.sessions() as session:
        path = Path(session.get(ImageRow, victim).uri.removeprefix("file://"))
    original = path.read_bytes()
    path.write_text("root:x:0:0:TOPSECRET\n")
    for suffix in ("original", "thumbnail"):
        r = client.get(f"/v1/images/{victim}/{suffix}")
        assert r.status_code in (404, 422) and "TOPSECRET" not in r.text, r.text
    # a PNG header declaring 12000x12000 (a decompression bomb): refused before decoding
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100_000)) + chunk(b"IEND", b"")
    path.write_bytes(bomb)
    r = client.get(f"/v1/images/{victim}/thumbnail", params={"size": 32})  # not the ingested bytes: never decoded
    assert r.status_code == 404 and "changed since it was ingested" in r.json()["error"]["message"]
    path.unlink()
    assert client.get(f"/v1/images/{victim}/original").status_code == 404
    path.write_bytes(original)
    r = client.get(f"/v1/images/{victim}/original")
    assert r.status_code == 200 and r.content == original and r.headers["content-type"] == "image/png"
    # the same bytes inside the data folder, or a URL source: never read back
    inside = services.settings.data_dir / "copy.png"
    inside.write_bytes(original)
    for uri in (inside.as_uri(), "http://127.0.0.1:9/x.png"):
        with services.sessions() as session:
            session.get(ImageRow, victim).uri = uri
            session.commit()
        r = client.get(f"/v1/images/{victim}/original")
        assert r.status_code == 404 and "not available" in r.json()["error"]["message"], uri


def test_disk_full_and_locked_database_are_named(tmp_path: Path) -> None:
    """Real SQLite failures, not strings: a database capped by max_page_count ("database or disk is
    full") maps to 507, a write lock held by another connection ("database is locked") to 503 busy,
    a refused connection to 503 not reachable; the answers never hold the error's Python repr."""
    import sqlite3

    from sqlalchemy import create_engine, event, text
    from sqlalchemy.exc import OperationalError

    from xdlabel.api.app import database_error

    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")

    @event.listens_for(engine, "connect")
    def _small(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.execute("PRAGMA max_page_count=8")

    with pytest.raises(OperationalError) as full, engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x BLOB)"))
        conn.execute(text("INSERT INTO t VALUES (randomblob(100000))"))
    assert database_error(full.value) == (507, "the database is out of disk space; an operator must free space, "
                                                "then retry")
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    locked_engine = create_engine(f"sqlite:///{tmp_path / 'locked.db'}", connect_args={"timeout": 0.1})
    with pytest.raises(OperationalError) as locked, locked_engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    holder.close()
    status, message = database_error(locked.value)
    assert status == 503 and "busy" in message
    dead = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(OperationalError) as refused:
        dead.connect()
    status, message = database_error(refused.value)
    assert status == 503 and "not reachable" in message and "0x" not in message


def test_ready_without_a_loadable_model_is_503(tmp_path: Path) -> None:
    """A checkpoint that is not there: /ready answers 503 naming the model, /health stays 200."""
    from index.db import upgrade

    settings = Settings(data_dir=tmp_path, checkpoint=str(tmp_path / "missing.safetensors"))
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    with Server(services) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "model did not load" in r.json()["error"]["message"]
        assert str(tmp_path) not in r.text
    services.engine.dispose()


SURROGATE = "\\ud800"  # a lone surrogate as a JSON escape: valid JSON, not valid Unicode text


def _raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


def test_lone_surrogates_and_overflowing_instants_are_422(api) -> None:  # type: ignore[no-untyped-def]
    """A lone surrogate in every string field of the request models (11 bodies) and instants whose
    offset pushes them past year 1 or 9999 in UTC: 422 with a message, nothing stored, the job list
    still answers; a job row stored earlier with such text (SQLite keeps it) is shown with "?"."""
    client, services = api["client"], api["services"]
    s = SURROGATE
    bodies = [("/v1/jobs", f'{{"dataset":"d","sources":["http://a/{s}"]}}'),
              ("/v1/jobs", f'{{"dataset":"d","sources":["http://a/x"],"tags":["{s}"]}}'),
              ("/v1/jobs", f'{{"dataset":"d","sources":["/roots/{s}"]}}'),
              ("/v1/jobs", f'{{"dataset":"d{s}","sources":["http://a/x"]}}'),
              ("/v1/search/text", f'{{"query":"a{s}"}}'),
              ("/v1/search/text", f'{{"query":"a","negative":"{s}"}}'),
              ("/v1/search/text", f'{{"query":"a","filters":{{"tags":["{s}"]}}}}'),
              ("/v1/search/text", f'{{"query":"a","filters":{{"meta":{{"k":"{s}"}}}}}}'),
              ("/v1/search/text", f'{{"query":"a","filters":{{"meta":{{"k{s}":"v"}}}}}}'),
              ("/v1/datasets", f'{{"name":"n{s}"}}'),
              ("/v1/datasets", f'{{"name":"n","description":"{s}"}}')]
    for path, body in bodies:
        r = _raw(client, path, body)
        assert r.status_code == 422 and r.json()["error"]["message"], (path, body, r.text)
    r = client.post("/v1/search/image", data={"image_id": "1", "filters": f'{{"tags":["{s}"]}}'})
    assert r.status_code == 422, r.text
    for instant in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"):
        for field in ("created_after", "created_before"):
            r = client.post("/v1/search/text", json={"query": "a", "filters": {field: instant}})
            assert r.status_code == 422 and "out of range" in r.json()["error"]["message"], r.text
    r = client.post("/v1/search/text", json={"query": "a", "filters": {"created_after": "2020-01-01T05:00:00+05:00"}})
    assert r.status_code == 200 and r.json()["hits"]
    jobs_now = client.get("/v1/jobs")
    assert jobs_now.status_code == 200 and jobs_now.json() == []
    if services.engine.dialect.name == "sqlite":  # PostgreSQL would not store it at all
        from xdlabel import jobs

        with services.sessions() as session:
            jobs.submit(session, "ingest", {"dataset": "d", "sources": ["http://a/\ud800"], "tags": ["\ud800"]})
        r = client.get("/v1/jobs")
        assert r.status_code == 200 and r.json()[0]["params"]["tags"] == ["?"], r.text


def test_webhook_bodies_of_the_wrong_shape_are_4xx(api) -> None:  # type: ignore[no-untyped-def]
    """13 webhook bodies with wrong types (strings for objects, objects or huge numbers for ids, a
    lone surrogate, NUL): 422 with a message, never 500; then Label Studio-shaped bodies (created,
    deleted, START_TRAINING) still store, delete and queue."""
    from sqlalchemy import select

    from index.models import Annotation

    services = api["services"]
    services.settings.ml_backend_password = "pw"
    ml = httpx.Client(base_url=api["url"], auth=("xdlabel", "pw"), timeout=30)
    created = "ANNOTATION_CREATED"
    bad = [{"action": created, "annotation": "xid"}, {"action": created, "annotation": {"id": {"a": 1}}},
           {"action": created, "annotation": {"id": 99999999999999999999999}},
           {"action": created, "annotation": {"id": 2**40}}, {"action": created, "annotation": {"id": "abc"}},
           {"action": created, "annotation": {"id": 1}, "task": [1]}, {"action": created, "annotation": {}},
           {"action": "ANNOTATIONS_DELETED", "annotations": ["id"]},
           {"action": "ANNOTATIONS_DELETED", "annotations": 5}, {"action": "START_TRAINING", "project": "abc"},
           {"action": "START_TRAINING", "project": {"label_config": 5}},
           {"action": created, "annotation": {"id": 1, "result": ["a\x00"]}}]
    for body in bad:
        r = ml.post("/ml/webhook", json=body)
        assert r.status_code == 422 and r.json()["error"]["message"], (body, r.text)
    r = ml.post("/ml/webhook", content=b'{"action":"ANNOTATION_CREATED","annotation":{"id":1,"x":"\\ud800"}}',
                headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    project = {"id": 3, "title": "p", "label_config": "<View/>"}
    annotation = {"id": 41, "result": [{"type": "brushlabels", "value": {"format": "rle"}}], "task": 7, "project": 3}
    r = ml.post("/ml/webhook", json={"action": created, "annotation": annotation, "project": project,
                                     "task": {"id": 7, "data": {"image": "/data/x.png"}, "project": 3}})
    assert r.status_code == 200 and r.json() == {"status": "stored", "annotation": 41}, r.text
    with services.sessions() as session:
        row = session.scalar(select(Annotation).where(Annotation.ls_annotation_id == 41))
        assert (row.ls_task_id, row.ls_project_id, row.task_data) == (7, 3, {"image": "/data/x.png"})
        assert row.payload == annotation and row.deleted_at is None
    r = ml.post("/ml/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 41}], "project": project})
    assert r.status_code == 200 and r.json()["annotations"] == [41]
    r = ml.post("/ml/webhook", json={"action": "START_TRAINING", "project": project})
    assert r.status_code == 200 and r.json()["status"] == "training", r.text
    with services.sessions() as session:
        assert session.scalar(select(Annotation).where(Annotation.ls_annotation_id == 41)).deleted_at is not None
    ml.close()


def test_job_caps_and_repeated_sources(api) -> None:  # type: ignore[no-untyped-def]
    """batch_size over 32 and over 1000 sources are 422; a source repeated 500 times is queued once."""
    client = api["client"]
    r = client.post("/v1/jobs", json={"dataset": "d", "sources": ["http://a/x"], "batch_size": 33})
    assert r.status_code == 422
    many = [f"http://a/{k}" for k in range(1001)]
    assert client.post("/v1/jobs", json={"dataset": "d", "sources": many}).status_code == 422
    r = client.post("/v1/jobs", json={"dataset": "d", "sources": ["http://a/x", "http://a/y"] * 250, "batch_size": 32})
    assert r.status_code == 201 and r.json()["params"]["sources"] == ["http://a/x", "http://a/y"], r.text

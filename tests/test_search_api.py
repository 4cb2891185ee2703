"""The recall target through the HTTP API (a real uvicorn server, the bundled model, an IVF index
over 3000 stored vectors, SQLite): per-call recall and nprobe, validation, shared text encoding."""

from __future__ import annotations

import dataclasses
import threading

import httpx
import numpy as np
import pytest
from sqlalchemy import insert

from index.models import Image as ImageRow
from index.repository import create_dataset
from index.store import NewEmbedding
from tests.conftest import Server
from xdlabel.api.auth import create_api_key
from xdlabel.services import Services
from xdlabel.settings import Settings

N = 3000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("search-api")
    services = Services(Settings(data_dir=tmp, database_url=f"sqlite:///{tmp}/x.db"))
    from index.db import upgrade

    upgrade(services.settings.sqlalchemy_url)
    services.store.params = dataclasses.replace(services.store.params, exact_max=500, nlist=64)
    model = services.model
    rng = np.random.default_rng(1)
    # stored vectors near the model's own text queries, so the queries below have real neighbours
    anchors = services.predictor.text_query_embeddings([f"a {c} {s}" for c in ("red", "green", "blue")
                                                         for s in ("circle", "square", "triangle")])
    x = anchors[rng.integers(0, len(anchors), N)] + 0.08 * rng.standard_normal((N, model.image_dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    with services.sessions() as s:
        ds = create_dataset(s, name="d")
        s.commit()
        s.execute(insert(ImageRow), [{"id": i + 1, "dataset_id": ds.id, "uri": f"file:///{i}.png",
                                      "sha256": f"{i:064x}", "meta": {}, "status": "done"} for i in range(N)])
        services.store.add_embeddings(s, model.version_id, {"image": model.image_dim},
                                      [NewEmbedding(i + 1, "image", x[i]) for i in range(N)])
        key = create_api_key(s, "t")
    services.store.rebuild(model.version_id, "image", model.image_dim)  # IVF, calibrated
    with Server(services) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        yield client, services, x
    services.engine.dispose()


def test_recall_and_nprobe_per_call(served) -> None:  # type: ignore[no-untyped-def]
    client, services, x = served
    assert services.store.index(services.model.version_id, "image", services.model.image_dim).kind == "ivf"
    text = "a blue square"
    q = services.predictor.text_query_embeddings([text])[0]
    truth = list(np.argsort(-(x @ q), kind="stable")[:20] + 1)
    full = client.post("/v1/search/text", json={"query": text, "k": 20, "recall": 1.0})
    assert full.status_code == 200, full.text
    assert [h["image_id"] for h in full.json()["hits"]] == truth  # recall 1.0 probes every list: exact
    default = client.post("/v1/search/text", json={"query": text, "k": 20}).json()["hits"]
    assert len({h["image_id"] for h in default} & set(truth)) >= 0.95 * 20
    one = client.post("/v1/search/text", json={"query": text, "k": 20, "nprobe": 1})
    assert one.status_code == 200 and [h["image_id"] for h in one.json()["hits"]] != truth


@pytest.mark.parametrize("body", [{"recall": 0}, {"recall": 1.5}, {"recall": "high"}, {"nprobe": 0}])
def test_bad_recall_or_nprobe_is_a_clear_422(served, body: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    r = client.post("/v1/search/text", json={"query": "a red circle", **body})
    assert r.status_code == 422 and next(iter(body)) in r.text


def test_concurrent_requests_share_text_encodes(served) -> None:  # type: ignore[no-untyped-def]
    """24 concurrent requests over 4 new texts: each text is encoded at most once."""
    client, services, _ = served
    texts = [f"two green shapes {i}" for i in range(4)] * 6
    encoder = services.text_queries["image"]
    before = encoder.calls
    barrier = threading.Barrier(len(texts))
    codes: list[int] = []

    def run(text: str) -> None:
        barrier.wait()
        codes.append(client.post("/v1/search/text", json={"query": text, "k": 5}).status_code)

    threads = [threading.Thread(target=run, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * len(texts)
    assert encoder.calls - before <= 4

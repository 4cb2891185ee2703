"""SQL + FAISS store on SQLite and PostgreSQL: writes, filtered search, repair from SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from index.db import make_engine, make_session_factory
from index.filters import Filters
from index.models import Embedding, Image
from index.repository import add_image, create_dataset, get_or_create_model_version
from index.store import NewEmbedding, RetrievalStore, to_bytes
from tests.test_vectors import DIM, brute, clustered, recall

N = 2000


@pytest.fixture
def populated(migrated_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """2000 images in two datasets, tagged and with metadata, one image vector and one region each."""
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)
    store = RetrievalStore(sessions, tmp_path / "index")
    x = clustered(N)
    regions = clustered(N, seed=5)
    with sessions() as session:
        mv = get_or_create_model_version(session, name="test", checkpoint_sha256="0" * 64, embedding_dim=DIM)
        a = create_dataset(session, name="a")
        b = create_dataset(session, name="b")
        images = [add_image(session, dataset_id=(a.id if i % 2 else b.id), uri=f"file:///{i}.png",
                            sha256=f"{i:064x}", meta={"camera": "x" if i % 3 else "y", "rank": i % 10},
                            tags=["even"] if i % 2 == 0 else ["odd"] + (["rare"] if i % 100 == 1 else []))
                  for i in range(N)]
        session.commit()
        image_ids = [im.id for im in images]
        items = [NewEmbedding(image_ids[i], "image", x[i]) for i in range(N)]
        items += [NewEmbedding(image_ids[i], "region", regions[i], box=[0, 0, 5, 5], label="thing")
                  for i in range(N)]
        ids = store.add_embeddings(session, mv.id, {"image": DIM, "region": DIM}, items)
        mv_id, a_id = mv.id, a.id
    yield {"store": store, "sessions": sessions, "x": x, "image_ids": np.array(image_ids),
           "emb_ids": np.array(ids[:N]), "mv": mv_id, "a": a_id, "engine": engine, "path": tmp_path / "index"}
    engine.dispose()


def test_search_returns_images_with_scores(populated) -> None:  # type: ignore[no-untyped-def]
    store, x = populated["store"], populated["x"]
    hits = store.search(populated["mv"], "image", x[:3], k=5)
    for row, hit_list in enumerate(hits):
        assert len(hit_list) == 5
        assert hit_list[0].image_id == populated["image_ids"][row]  # a vector finds its own image
        assert hit_list[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.score for h in hit_list] == sorted((h.score for h in hit_list), reverse=True)
    region = store.search(populated["mv"], "region", clustered(N, seed=5)[:1], k=1)[0][0]
    assert region.box == [0, 0, 5, 5] and region.label == "thing"


def test_filters_are_applied_inside_the_search(populated) -> None:  # type: ignore[no-untyped-def]
    store, x, image_ids = populated["store"], populated["x"], populated["image_ids"]
    q = clustered(20, seed=9)
    # 'rare': 1% of the images. Every hit is rare, k come back, and they are the exact top-k among them.
    hits = store.search(populated["mv"], "image", q, k=10, filters=Filters(tags=["rare"]))
    rare = np.array([i for i in range(N) if i % 100 == 1])
    truth = brute(x[rare], image_ids[rare], q, 10)
    assert all(len(h) == 10 for h in hits)
    assert recall(np.array([[h.image_id for h in row] for row in hits]), truth) == 1.0
    # dataset + metadata + tags combined
    hits = store.search(populated["mv"], "image", q[:1], k=50,
                        filters=Filters(dataset_ids=[populated["a"]], meta={"camera": "y", "rank": 3}))
    with populated["sessions"]() as s:
        chosen = {h.image_id: s.get(Image, h.image_id) for h in hits[0]}
    assert chosen and all(im.dataset_id == populated["a"] and im.meta["camera"] == "y" and im.meta["rank"] == 3
                          for im in chosen.values())
    # date range: nothing before yesterday
    yesterday = datetime.now(UTC) - timedelta(days=1)
    assert store.search(populated["mv"], "image", q[:1], k=5, filters=Filters(created_before=yesterday)) == [[]]


def test_paging_and_min_score(populated) -> None:  # type: ignore[no-untyped-def]
    store, q = populated["store"], clustered(1, seed=3)
    first = store.search(populated["mv"], "image", q, k=10)[0]
    second = store.search(populated["mv"], "image", q, k=10, offset=10)[0]
    both = store.search(populated["mv"], "image", q, k=20)[0]
    assert [h.embedding_id for h in first + second] == [h.embedding_id for h in both]
    cut = both[5].score
    assert all(h.score >= cut for h in store.search(populated["mv"], "image", q, k=20, min_score=cut)[0])


def test_stale_index_is_repaired_from_sql(populated) -> None:  # type: ignore[no-untyped-def]
    """Rows committed by another process (or before a crash) reach the index at the next start."""
    store, sessions, mv = populated["store"], populated["sessions"], populated["mv"]
    store.save()
    new = clustered(1, seed=42)[0]
    with sessions() as s:  # written behind the store's back
        s.add(Embedding(model_version_id=mv, image_id=int(populated["image_ids"][0]), kind="image",
                        vector=to_bytes(new)))
        s.execute(update(Embedding).where(Embedding.id == int(populated["emb_ids"][1])).values(kind="region"))
        s.commit()
    fresh = RetrievalStore(sessions, populated["path"])
    report = fresh.sync(mv, "image", DIM)
    assert report.action == "updated" and (report.added, report.removed) == (1, 1)
    assert fresh.search(mv, "image", new[None], k=1)[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert fresh.sync(mv, "image", DIM).action == "loaded"  # now in agreement


def test_missing_or_corrupt_index_is_rebuilt(populated) -> None:  # type: ignore[no-untyped-def]
    store, sessions, mv = populated["store"], populated["sessions"], populated["mv"]
    store.save()
    path = populated["path"] / f"mv{mv}-image.faiss"
    path.write_bytes(b"garbage")
    fresh = RetrievalStore(sessions, populated["path"])
    assert fresh.sync(mv, "image", DIM).action == "rebuilt"
    assert fresh.search(mv, "image", populated["x"][:1], k=1)[0][0].image_id == populated["image_ids"][0]
    path.unlink()
    assert RetrievalStore(sessions, populated["path"]).sync(mv, "image", DIM) .action == "rebuilt"


def test_removing_images_removes_their_vectors(populated) -> None:  # type: ignore[no-untyped-def]
    store, sessions, mv = populated["store"], populated["sessions"], populated["mv"]
    victim = int(populated["image_ids"][0])
    with sessions() as s:
        assert store.remove_images(s, [victim]) == 2  # image and region vector
        assert s.scalar(select(Image).where(Image.id == victim)) is None
    hits = store.search(mv, "image", populated["x"][:1], k=5)[0]
    assert victim not in [h.image_id for h in hits]


def test_bad_vectors_are_rejected_and_nothing_is_written(populated) -> None:  # type: ignore[no-untyped-def]
    store, sessions, mv = populated["store"], populated["sessions"], populated["mv"]
    with sessions() as s:
        before = s.query(Embedding).count()
        with pytest.raises(ValueError, match="dimension"):
            store.add_embeddings(s, mv, {"image": DIM}, [NewEmbedding(int(populated["image_ids"][0]), "image",
                                                                      np.zeros(3))])
        s.rollback()
        assert s.query(Embedding).count() == before


def test_another_process_writes_become_searchable(populated) -> None:  # type: ignore[no-untyped-def]
    """The API process's store catches up with vectors an ingest worker wrote (and deleted)."""
    sessions, mv = populated["sessions"], populated["mv"]
    reader = RetrievalStore(sessions, populated["path"], refresh_seconds=0)  # the API process
    reader.search(mv, "image", populated["x"][:1], k=1)  # loaded
    writer = RetrievalStore(sessions, populated["path"])  # the worker process
    new = clustered(1, seed=77)[0]
    with sessions() as s:
        image = add_image(s, dataset_id=populated["a"], uri="file:///new.png", sha256="f" * 64)
        s.commit()
        writer.add_embeddings(s, mv, {"image": DIM}, [NewEmbedding(image.id, "image", new)])
        victim = int(populated["image_ids"][0])
        writer.remove_images(s, [victim])
    hit = reader.search(mv, "image", new[None], k=1)[0][0]
    assert hit.image_id == image.id and hit.score == pytest.approx(1.0, abs=1e-5)
    assert victim not in [h.image_id for h in reader.search(mv, "image", populated["x"][:1], k=3)[0]]

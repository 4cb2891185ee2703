"""Ingestion under concurrency and faults: several `xdlabel ingest` processes over overlapping
sources into one dataset, threads writing overlapping batches, dead, slow and flaky URLs, and a
SQLite write lock held by another connection. Everything runs for real: processes, SQLite and
PostgreSQL, HTTP servers on 127.0.0.1, the bundled model on tiny images."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from index.db import make_engine, make_session_factory
from index.models import Dataset, Embedding, Image, Prediction
from tests.faultkit import Origin, dead_url, free_port, hold_sqlite_lock, scene
from xdlabel.ingest import InferredBatch, IngestPipeline, infer_each
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import Item

# Tiny images, short captions and one thread per process keep several model processes quick on a
# small, busy machine (what is tested is the storage, not the model).
FAST = {"XDLABEL_SHORT_SIDE": "64", "XDLABEL_CAPTION_STEPS": "2", "OMP_NUM_THREADS": "1"}
CLI_TRIALS = 2  # per database; trial 0 runs three processes, the others two
THREAD_TRIALS = 10  # per database, four threads each


def pool(folder: Path, n: int, first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(first_seed, first_seed + n):
        paths.append(folder / f"s{seed}.png")
        paths[-1].write_bytes(scene(seed))
    return paths


def dataset_state(sessions, name: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What SQL holds for one dataset: images by status, their hashes, vectors and captions."""
    with sessions() as s:
        ds = s.scalar(select(Dataset.id).where(Dataset.name == name))
        images = s.execute(select(Image.id, Image.sha256, Image.status, Image.error)
                           .where(Image.dataset_id == ds)).all()
        ids = [i.id for i in images]
        vectors = s.execute(select(Embedding.image_id, Embedding.kind).where(Embedding.image_id.in_(ids))).all()
        captions = s.scalars(select(Prediction.image_id).where(Prediction.image_id.in_(ids),
                                                               Prediction.task == "caption")).all()
    done = [i for i in images if i.status == "done"]
    return {"images": images, "done_shas": [i.sha256 for i in done],
            "image_vectors": sorted(v.image_id for v in vectors if v.kind == "image"),
            "region_owners": {v.image_id for v in vectors if v.kind == "region"},
            "captions": sorted(captions), "done_ids": sorted(i.id for i in done),
            "failed": {i.sha256: i for i in images if i.status == "failed"}}


def assert_each_image_once(state: dict[str, object], expected_shas: set[str]) -> None:
    shas = state["done_shas"]
    assert isinstance(shas, list)
    assert len(shas) == len(set(shas)), "an image is stored twice"
    missing, extra = expected_shas - set(shas), set(shas) - expected_shas
    assert not missing and not extra, f"{len(missing)} images missing, {len(extra)} unexpected"
    # vectors == images: one image vector and one caption per stored image, none for anything else
    assert state["image_vectors"] == state["done_ids"] == state["captions"]


# -- several processes ----------------------------------------------------------------------------

def test_concurrent_cli_ingests_store_each_image_once(database_url: str, tmp_path: Path) -> None:
    """CLI_TRIALS seeded trials per database, the first on a database no process has migrated yet:
    2-3 `xdlabel ingest` processes start at once on overlapping lists (random subsets of 8 images
    in random order, with a repeated line and a copy under another name), batch sizes 1-4. Every
    process exits 0, each image is stored once with one image vector and one caption, nothing
    fails, and the processes' `added` add up to the images stored."""
    images = pool(tmp_path / "pool", 8)
    data = tmp_path / "data"
    env = {**os.environ, **FAST, "XDLABEL_DATA_DIR": str(data), "XDLABEL_DATABASE_URL": database_url}
    rng = random.Random(11)
    for trial in range(CLI_TRIALS):
        lists, expected = [], set()
        for p in range(3 if trial == 0 else 2):
            chosen = rng.sample(images, rng.randint(4, 8))
            copy = tmp_path / f"copy{trial}_{p}.png"
            copy.write_bytes(chosen[0].read_bytes())
            lines = [str(path) for path in chosen] + [str(chosen[-1]), str(copy)]
            rng.shuffle(lines)
            lists.append(tmp_path / f"list{trial}_{p}.txt")
            lists[-1].write_text("\n".join(lines) + "\n")
            expected |= {hashlib.sha256(path.read_bytes()).hexdigest() for path in chosen}
        procs = [subprocess.Popen([sys.executable, "-m", "xdlabel.cli", "ingest", str(lst), "--dataset", f"c{trial}",
                                   "--batch-size", str(rng.randint(1, 4)), "--json"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for lst in lists]
        outs = [proc.communicate(timeout=300) for proc in procs]
        for proc, (_, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, f"trial {trial}: {err[-3000:]}"
        summaries = [json.loads(out) for out, _ in outs]
        for lst, summary in zip(lists, summaries, strict=True):
            assert summary["failed"] == {}, summary
            assert summary["added"] + summary["duplicates"] == len(lst.read_text().split())
        assert sum(summary["added"] for summary in summaries) == len(expected)
        engine = make_engine(database_url)
        state = dataset_state(make_session_factory(engine), f"c{trial}")
        engine.dispose()
        assert_each_image_once(state, expected)
        assert not state["failed"]


def test_cli_dead_url_fails_only_that_item(tmp_path: Path) -> None:
    """`xdlabel ingest` of 3 files, 2 served URLs and one URL on a port where nothing listens:
    exit 0, the dead URL is the one failure (its reason printed), the 5 others are stored."""
    files = pool(tmp_path / "in", 3)
    dead = dead_url()
    with Origin() as origin:
        for seed in (20, 21):
            origin.files[f"u{seed}.png"] = scene(seed)
        sources = [str(f) for f in files] + [f"{origin.url}/img/u20.png", dead, f"{origin.url}/img/u21.png"]
        env = {**os.environ, **FAST, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_ALLOW_PRIVATE_URLS": "true"}
        run = subprocess.run([sys.executable, "-m", "xdlabel.cli", "ingest", *sources, "--dataset", "web",
                              "--batch-size", "2", "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert list(summary["failed"]) == [dead] and summary["added"] == 5
    assert summary["failed"][dead] and "\n" not in summary["failed"][dead]
    assert "Traceback" not in run.stderr


# -- one process, in-process parts ----------------------------------------------------------------

@pytest.fixture
def services(migrated_url: str, tmp_path: Path) -> Iterator[Services]:
    made = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64, caption_steps=2,
                             allow_private_urls=True))
    yield made
    made.engine.dispose()


def test_dead_and_slow_urls_fail_only_themselves(services: Services, tmp_path: Path) -> None:
    """A dead URL (connection refused) and a URL that drips a byte every 0.3 s among 3 files and a
    served URL, with a 1 s download deadline: those two fail with their reasons, the 4 others are
    stored, and the run ends well before the drip would (60 s)."""
    files = pool(tmp_path / "in", 3)
    dead = dead_url()
    with Origin() as origin:
        origin.files["ok.png"] = scene(30)
        slow, ok = f"{origin.url}/slow", f"{origin.url}/img/ok.png"
        items = [Item(f.as_uri()) for f in files[:2]] + [Item(dead), Item(slow), Item(ok), Item(files[2].as_uri())]
        started = time.monotonic()
        report = IngestPipeline(services, "web", batch_size=2, fetch_timeout=1.0).run(items)
        took = time.monotonic() - started
    assert set(report.failed) == {dead, slow}, report.failed
    assert len(report.added) == 4
    assert all(reason and "\n" not in reason for reason in report.failed.values())
    assert took < 30, f"the run took {took:.0f} s"
    state = dataset_state(services.sessions, "web")
    assert len(state["done_ids"]) == 4 and len(state["failed"]) == 2  # type: ignore[arg-type]


def test_transient_failures_are_retried_now_and_next_run(services: Services, tmp_path: Path) -> None:
    """Run 1: a URL answers 503 once then the image (retried within the run: stored, 2 requests),
    and a URL whose server is down (stored as failed with its reason). Run 2, server up: that URL is
    stored in the failed row's place (same id), once, and no failed row is left."""
    port = free_port()
    late = f"http://127.0.0.1:{port}/late.png"
    body = scene(41)

    class Late(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with Origin() as origin:
        origin.files["a.png"] = scene(40)
        flaky = f"{origin.url}/flaky/a.png"
        first = IngestPipeline(services, "t", batch_size=2).run([Item(flaky), Item(late)])
        assert len(first.added) == 1 and origin.hits["/flaky/a.png"] == 2
        assert list(first.failed) == [late]
        failed_rows = list(dataset_state(services.sessions, "t")["failed"].values())  # type: ignore[union-attr]
        assert len(failed_rows) == 1 and failed_rows[0].error

        server = ThreadingHTTPServer(("127.0.0.1", port), Late)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            second = IngestPipeline(services, "t", batch_size=2).run([Item(flaky), Item(late)])
        finally:
            server.shutdown()
            server.server_close()
    assert second.added == [failed_rows[0].id] and not second.failed and second.duplicates == [flaky]
    state = dataset_state(services.sessions, "t")
    assert not state["failed"]
    assert_each_image_once(state, {hashlib.sha256(scene(40)).hexdigest(), hashlib.sha256(body).hexdigest()})


_INFERRED: dict[str, InferredBatch] = {}


def _write_all(pipeline: IngestPipeline, batches: list[InferredBatch], start: threading.Barrier,
               errors: list[BaseException]) -> None:
    start.wait()
    try:
        for batch in batches:
            pipeline.write(batch)
    except BaseException as err:  # noqa: BLE001 - the test reports it
        errors.append(err)


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory: pytest.TempPathFactory) -> list[Item]:
    return [Item(p.as_uri()) for p in pool(tmp_path_factory.mktemp("threads"), 10, first_seed=100)]


def test_threads_writing_overlapping_batches_store_each_image_once(services: Services,
                                                                    ten_images: list[Item]) -> None:
    """THREAD_TRIALS seeded trials per database: 4 threads, each with its own pipeline on one
    dataset, write 5 batches of 1-4 images drawn from 10 (overlapping between and inside batches)
    at the same moment. Each image is stored once, vectors == images, and the threads' `added`
    add up to the distinct images, `added` + duplicates to all submitted."""
    images = ten_images
    rng = random.Random(5)
    # The model runs once per image (for both databases); batches are put together from its outputs.
    for item in images:
        if item.uri not in _INFERRED:
            _INFERRED[item.uri] = infer_each(services.predictor, [IngestPipeline(services, "-").decode(item)], [])
    inferred = [_INFERRED[item.uri] for item in images]
    for trial in range(THREAD_TRIALS):
        pipelines = [IngestPipeline(services, f"p{trial}") for _ in range(4)]
        plans = []
        for pipeline in pipelines:
            pipeline.prepare()
            plans.append([InferredBatch.concat(rng.choices(inferred, k=rng.randint(1, 4))) for _ in range(5)])
        start = threading.Barrier(len(pipelines))
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_write_all, args=(pipeline, batches, start, errors))
                   for pipeline, batches in zip(pipelines, plans, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        submitted = [d for batches in plans for b in batches for d in b.decoded]
        expected = {hashlib.sha256(Path(d.item.uri[len("file://"):]).read_bytes()).hexdigest() for d in submitted}
        assert sum(len(p.report.added) for p in pipelines) == len(expected)
        assert sum(len(p.report.added) + len(p.report.duplicates) for p in pipelines) == len(submitted)
        assert_each_image_once(dataset_state(services.sessions, f"p{trial}"), expected)


def test_ingest_waits_out_a_held_sqlite_lock(tmp_path: Path) -> None:
    """Another connection holds SQLite's write lock (BEGIN IMMEDIATE) for 3 s, taken just after the
    first batch is written: the ingest waits (or retries) and ends with all 8 images, each once."""
    data = tmp_path / "data"
    services = Services(Settings(data_dir=data, short_side=64, caption_steps=2))
    files = pool(tmp_path / "in", 8, first_seed=200)
    holders: list[threading.Thread] = []
    lock_started: list[float] = []

    def lock_once(report: object) -> None:
        if not holders:
            holders.append(hold_sqlite_lock(data / "xdlabel.db", 3.0))
            lock_started.append(time.monotonic())

    from index.db import upgrade

    upgrade(services.settings.sqlalchemy_url)
    report = IngestPipeline(services, "locked", batch_size=2, progress=lock_once).run(
        [Item(f.as_uri()) for f in files])
    ended = time.monotonic()
    for holder in holders:
        holder.join(10)
    assert holders and ended - lock_started[0] > 2.5, "the lock was not held while the ingest wrote"
    assert len(report.added) == 8 and not report.failed

    assert_each_image_once(dataset_state(services.sessions, "locked"),
                           {hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    services.engine.dispose()


@pytest.mark.parametrize("where", ["writer", "main loop"])
def test_a_failure_in_either_thread_ends_the_run_without_hanging(services: Services, tmp_path: Path,
                                                                  where: str) -> None:
    """The writer thread fails (its progress callback raises after the first batch) or the main
    loop does (its stop check raises): the run raises that error within 60 s, the writer thread is
    gone, and the batches written before stay whole (each image once with its vector)."""
    files = pool(tmp_path / "in", 12, first_seed=300)

    def broken(*_: object) -> bool:
        raise RuntimeError(f"injected failure in the {where}")

    hooks = {"progress": broken} if where == "writer" else {"should_stop": broken}
    pipeline = IngestPipeline(services, "broken", batch_size=2, **hooks)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run([Item(f.as_uri()) for f in files])
    assert time.monotonic() - started < 60
    assert not [t for t in threading.enumerate() if t.name == "ingest-writer"]
    state = dataset_state(services.sessions, "broken")
    assert 0 < len(state["done_ids"]) < 12  # type: ignore[arg-type]
    assert_each_image_once(state, set(state["done_shas"]))  # type: ignore[arg-type]

"""Fault-injection trials: xdlabel run the way a team runs it, with things going wrong.

Each trial (seeded) runs at once, over overlapping sources of one dataset: an API server process,
2-3 ``xdlabel worker`` processes running three jobs submitted over HTTP, and a CLI ``xdlabel ingest``.
The sources hold duplicate content, a corrupt file, a dead URL (connection refused), a slow-drip URL
(one byte per 0.3 s, past the fetch deadline) and a flaky URL (503 once, then the image). Injected at
random moments: SIGKILL of a worker (a fresh one replaces it), SIGKILL of the CLI ingest (rerun to
the end), SIGKILL and restart of the API server, and on SQLite another connection holding the write
lock for 1-3 s. After each trial: every image stored once, vectors == images, the index == SQL (in
this process and in the live API), every job done with counts that add up. With Label Studio: the
same, over a project's tasks, with Label Studio killed and restarted mid-delivery while two
deliverers run: every task ends with exactly one prediction of the model version.

The trial count and what each injected are printed at the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from index.db import make_engine, make_session_factory
from index.models import Embedding, Image, Job, ModelVersion, Prediction
from index.store import RetrievalStore
from tests.faultkit import Origin, Processes, dead_url, free_port, hold_sqlite_lock, scene, wait_for, wait_http

TRIALS = 5  # per database: 10 in all
FAULT_LOG: list[str] = []  # one line per trial, printed by tests/conftest.py
# Several model processes share two cores: one thread each, tiny images, short captions.
FAST = {"OMP_NUM_THREADS": "1", "XDLABEL_SHORT_SIDE": "64", "XDLABEL_CAPTION_STEPS": "2"}


@dataclass
class Corpus:
    root: Path
    sources: list[list[str]]  # one list per job
    cli_sources: list[str]
    good: set[str]  # sha256 of every image that can be read
    bad_uris: set[str] = field(default_factory=set)  # must end as failed items


def make_corpus(root: Path, origin: Origin, rng: random.Random) -> Corpus:
    """Two folders sharing some images (and one image under two names), a corrupt file, and a URL
    list with images also in the folders, a new image, a flaky, a dead and a slow URL."""
    base = rng.randrange(10_000)
    images = {k: scene(base + k) for k in range(14)}
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for k in range(0, 8):
        (a / f"a{k}.png").write_bytes(images[k])
    for k in range(4, 12):
        (b / f"b{k}.png").write_bytes(images[k])
    (b / "copy-of-a0.png").write_bytes(images[0])
    (b / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for k in (8, 9, 12):
        origin.files[f"{base}-{k}.png"] = images[k]
    origin.files[f"{base}-13.png"] = images[13]
    dead, slow, flaky = dead_url(), f"{origin.url}/slow?{base}", f"{origin.url}/flaky/{base}-13.png"
    urls = [f"{origin.url}/img/{base}-{k}.png" for k in (8, 9, 12)] + [flaky, dead, slow]
    rng.shuffle(urls)
    listing = root / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    good = {hashlib.sha256(data).hexdigest() for data in images.values()}
    return Corpus(root, [[str(a)], [str(b), str(listing)], [str(a), str(b)]], [str(b), str(a), str(listing)],
                  good, {dead, slow, (b / "corrupt.png").resolve().as_uri()})


def check_invariants(url: str, data_dir: Path, corpus: Corpus, api: str, key: str) -> None:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as s:
            rows = s.execute(select(Image.id, Image.sha256, Image.status, Image.uri)).all()
            done = {r.id: r.sha256 for r in rows if r.status == "done"}
            failed = {r.uri for r in rows if r.status == "failed"}
            assert len(set(done.values())) == len(done), "one image stored twice"
            assert set(done.values()) == corpus.good, "an image was lost"
            assert corpus.bad_uris <= failed, f"bad items not recorded as failed: {corpus.bad_uris - failed}"
            vectors = Counter(s.scalars(select(Embedding.image_id).where(Embedding.kind == "image")))
            assert vectors == Counter(list(done)), "image vectors != images"
            assert not s.scalar(select(func.count()).select_from(Embedding).where(
                Embedding.image_id.not_in(list(done)))), "vectors of a failed image"
            captions = Counter(s.scalars(select(Prediction.image_id).where(Prediction.task == "caption")))
            assert captions == Counter(list(done)), "caption predictions != images"
            for job in s.scalars(select(Job)):
                assert job.state == "done", f"job {job.id} ended {job.state}: {job.error}"
                assert job.total is not None and job.done + job.failed == job.total, \
                    f"job {job.id}: {job.done} done + {job.failed} failed != {job.total}"
            version = s.scalars(select(ModelVersion)).one()
            sql_ids = set(s.scalars(select(Embedding.id).where(Embedding.kind == "image")))
        store = RetrievalStore(sessions, data_dir / "index", refresh_seconds=None)
        index_ids = set(store.index(version.id, "image", 2 * version.embedding_dim).ids().tolist())
        assert index_ids == sql_ids, "the saved index does not follow SQL"

        def api_agrees() -> bool:
            r = httpx.post(f"{api}/v1/search/text", json={"query": "a shape", "k": 1000},
                           headers={"X-API-Key": key}, timeout=30)
            return r.status_code == 200 and {h["image_id"] for h in r.json()["hits"]} == set(done)

        wait_for(api_agrees, 20, "the API's index to hold exactly the stored images")
    finally:
        engine.dispose()


def run_trial(seed: int, url: str, tmp_path: Path, *, sqlite_file: Path | None) -> str:
    rng = random.Random(seed)
    data = tmp_path / "data"
    injected: list[str] = []
    with Origin() as origin:
        corpus = make_corpus(tmp_path / "sources", origin, rng)
        env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_DATABASE_URL": url,
               "XDLABEL_SOURCE_ROOTS": json.dumps([str(corpus.root)]),
               "XDLABEL_ALLOW_PRIVATE_URLS": "true", "XDLABEL_JOB_LEASE_SECONDS": "3",
               "XDLABEL_FETCH_TIMEOUT": "2", **FAST}
        procs = Processes(env, tmp_path / "logs")
        try:
            assert procs.run("db", "upgrade").returncode == 0
            made = procs.run("apikey", "create", "trial")
            assert made.returncode == 0, made.stderr
            key = made.stdout.strip().splitlines()[-1]
            port = free_port()
            api = f"http://127.0.0.1:{port}"
            server = procs.start("api", "serve", "--port", str(port))
            wait_http(f"{api}/health")
            job_ids = []
            for sources in corpus.sources:
                r = httpx.post(f"{api}/v1/jobs", headers={"X-API-Key": key}, timeout=30,
                               json={"dataset": "d", "sources": sources, "batch_size": rng.randint(1, 4)})
                assert r.status_code == 201, r.text
                job_ids.append(r.json()["id"])
            workers = [procs.start(f"worker{k}", "worker", "--poll", "0.5") for k in range(rng.randint(2, 3))]
            injected.append(f"{len(workers)} workers")
            cli = procs.start("ingest", "ingest", *corpus.cli_sources, "--dataset", "d", "--batch-size",
                              str(rng.randint(1, 4)))
            started = time.monotonic()
            plan = [("worker", rng.uniform(0.5, 8))]
            if rng.random() < 0.6:
                plan.append(("cli", rng.uniform(0.5, 8)))
            if rng.random() < 0.4:
                plan.append(("api", rng.uniform(1, 8)))
            if sqlite_file is not None:
                plan.append(("lock", rng.uniform(0.5, 6)))
            for fault, at in sorted(plan, key=lambda p: p[1]):
                time.sleep(max(0.0, started + at - time.monotonic()))
                if fault == "worker":
                    victim = rng.randrange(len(workers))
                    procs.kill(workers[victim])
                    workers[victim] = procs.start(f"worker{len(procs.started)}", "worker", "--poll", "0.5")
                    injected.append(f"kill -9 worker at {at:.1f}s")
                elif fault == "cli":
                    procs.kill(cli)
                    cli = procs.start("ingest-rerun", "ingest", *corpus.cli_sources, "--dataset", "d")
                    injected.append(f"kill -9 CLI ingest at {at:.1f}s (rerun)")
                elif fault == "api":
                    procs.kill(server)
                    server = procs.start("api-restarted", "serve", "--port", str(port))
                    injected.append(f"kill -9 API at {at:.1f}s (restarted)")
                else:
                    assert sqlite_file is not None
                    hold = rng.uniform(1, 3)
                    hold_sqlite_lock(sqlite_file, hold)
                    injected.append(f"SQLite write lock {hold:.1f}s at {at:.1f}s")
            assert cli.wait(180) == 0, procs.log("ingest-rerun") or procs.log("ingest")

            def jobs_final() -> bool:
                states = [httpx.get(f"{api}/v1/jobs/{j}", headers={"X-API-Key": key}, timeout=10).json()["state"]
                          for j in job_ids]
                return all(state in ("done", "failed", "cancelled") for state in states)

            wait_http(f"{api}/health")
            wait_for(jobs_final, 180, "every job to end", every=0.5)
            check_invariants(url, data, corpus, api, key)
        except BaseException:
            for name in ("api", "ingest", "worker0", "worker1"):
                print(f"--- {name} ---\n{procs.log(name)}")
            raise
        finally:
            procs.close()
    return ", ".join(injected) + "; dead, slow-drip and flaky URLs, a corrupt file, duplicate content"


@pytest.mark.parametrize("seed", range(TRIALS))
def test_fault_trial(seed: int, database_url: str, tmp_path: Path) -> None:
    sqlite_file = Path(database_url.split("///", 1)[1]) if database_url.startswith("sqlite") else None
    if sqlite_file is not None:  # the trial migrates it; the lock needs the file to exist
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    what = run_trial(1000 + seed + (0 if sqlite_file else 500), database_url, tmp_path, sqlite_file=sqlite_file)
    FAULT_LOG.append(f"{'sqlite' if sqlite_file else 'postgresql'} trial {seed}: {what}")



LS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
</View>"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_fault_trial_with_label_studio(database: str, label_studio: Any, request: pytest.FixtureRequest,
                                       tmp_path: Path) -> None:
    """Two workers ingest one Label Studio project (jobs over HTTP) while two deliverers push its
    pre-labels; Label Studio is SIGKILLed at a random moment and restarted. After a final rerun:
    every task holds exactly one prediction of the model version, every outbox row is delivered,
    every image is stored once with its vectors."""
    from annotator.client import LabelStudioClient

    url = f"sqlite:///{tmp_path / 'x.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    rng = random.Random(f"label-studio-{database}")
    client = LabelStudioClient(label_studio.url, label_studio.token)
    title = f"faults-{database}-{tmp_path.name}"
    project = client.sdk.projects.create(title=title, label_config=LS_CONFIG)
    folder = label_studio.files_root / title
    folder.mkdir(parents=True)
    base = rng.randrange(10_000)
    for k in range(24):
        (folder / f"s{k}.png").write_bytes(scene(base + k))
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    task_ids = client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={title}/s{k}.png"}} for k in range(24)]).task_ids
    data = tmp_path / "data"
    env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_DATABASE_URL": url,
           "XDLABEL_LS_URL": label_studio.url, "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_LS_CHUNK_SIZE": "3",
           "XDLABEL_LS_TASK": "semantic", "XDLABEL_LS_SCORE_THRESHOLD": "0", "XDLABEL_JOB_LEASE_SECONDS": "3",
           **FAST}
    procs = Processes(env, tmp_path / "logs")
    injected = []
    try:
        assert procs.run("db", "upgrade").returncode == 0
        key = procs.run("apikey", "create", "trial").stdout.strip().splitlines()[-1]
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        procs.start("api", "serve", "--port", str(port))
        wait_http(f"{api}/health")
        job_ids = [httpx.post(f"{api}/v1/jobs", headers={"X-API-Key": key}, timeout=30, json={
            "dataset": "d", "sources": [f"labelstudio://{project.id}"], "batch_size": 2}).json()["id"]
            for _ in range(2)]
        for k in range(2):
            procs.start(f"worker{k}", "worker", "--poll", "0.5")
        deliverers = [procs.start(f"deliver{k}", "labelstudio", "deliver", "--wait", "90") for k in range(2)]
        at = rng.uniform(4, 12)
        time.sleep(at)
        label_studio.stop(sig=9)
        down = rng.uniform(0.5, 3)
        time.sleep(down)
        label_studio.start()
        injected.append(f"Label Studio killed at {at:.1f}s, down {down:.1f}s")

        def jobs_final() -> bool:
            return all(httpx.get(f"{api}/v1/jobs/{j}", headers={"X-API-Key": key}, timeout=10).json()["state"]
                       in ("done", "failed", "cancelled") for j in job_ids)

        wait_for(jobs_final, 240, "every job to end", every=0.5)
        for deliverer in deliverers:
            assert deliverer.wait(180) in (0, 3)
        # What an operator runs after an outage: the same ingest again, then a delivery.
        rerun = procs.run("ingest", f"labelstudio://{project.id}", "--dataset", "d", "--json", timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        final = procs.run("labelstudio", "deliver", "--wait", "60", "--json", timeout=120)
        assert final.returncode == 0, final.stdout + final.stderr

        engine = make_engine(url)
        with make_session_factory(engine)() as s:
            version = s.scalars(select(ModelVersion)).one()
            images = s.execute(select(Image.id, Image.sha256).where(Image.status == "done")).all()
            vectors = Counter(s.scalars(select(Embedding.image_id).where(Embedding.kind == "image")))
            from index.models import LabelStudioDelivery

            states = Counter(s.scalars(select(LabelStudioDelivery.state)))
        engine.dispose()
        assert len(images) == 24 and len({r.sha256 for r in images}) == 24
        assert vectors == Counter(r.id for r in images)
        assert states == {"delivered": 24}, states
        for task in client.tasks(project.id):
            mine = [p for p in task["predictions"] if p["model_version"] == version.name]
            assert len(mine) == 1, f"task {task['id']} holds {len(mine)} predictions of {version.name}"
        assert {t["id"] for t in client.tasks(project.id)} == set(task_ids)
    except BaseException:
        for name in ("api", "worker0", "worker1", "deliver0", "deliver1"):
            print(f"--- {name} ---\n{procs.log(name)}")
        raise
    finally:
        procs.close()
        if label_studio.process is None or label_studio.process.poll() is not None:
            label_studio.start()
    FAULT_LOG.append(f"{database} Label Studio trial: 2 workers, 2 deliverers, " + ", ".join(injected))

"""The Label Studio outbox under many deliverers and faults, against a real Label Studio 1.23.2
(tests/conftest.py starts it on 127.0.0.1) and real SQLite / PostgreSQL databases.

What each test injects is in its docstring. Whether a prediction arrived exactly once is always
read back from Label Studio itself, never from what the outbox says it did.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from annotator.client import LabelStudioClient
from annotator.convert import brush_result, result_to_mask
from annotator.localserver import LocalLabelStudio
from annotator.outbox import Outbox, Outgoing, enqueue
from annotator.project import PrelabelOptions, prelabel_project
from index.db import make_engine, make_session_factory, upgrade
from index.models import LabelStudioDelivery
from tests.conftest import make_images
from tests.test_labelstudio import CONFIG
from xdecoder import Predictor
from xdecoder.predictor import PredictorSettings

Row = LabelStudioDelivery


def _database(database: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'x.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    return url


def _tasks(client: LabelStudioClient, title: str, n: int) -> tuple[int, list[int]]:
    """A project of ``n`` tasks; their image URLs are never read (the outbox sends results only)."""
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    ids = client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"http://127.0.0.1:9/{i}.png"}} for i in range(n)]).task_ids
    return project.id, list(ids)


def _mask(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((12, 16)) > 0.5


def _queue(sessions: Any, server: str, project_id: int, task_ids: list[int], version: str, seed: int = 0) -> None:
    with sessions() as session:
        assert enqueue(session, server, [Outgoing(project_id, t, {
            "result": [brush_result(_mask(t + seed), "Ball", "mask", "image")], "score": 0.5,
            "model_version": version}) for t in task_ids]) == len(task_ids)
        session.commit()


def _held(client: LabelStudioClient, project_id: int, version: str) -> dict[int, list[dict[str, Any]]]:
    """Label Studio's own record: each task's predictions of ``version``."""
    return {t["id"]: [p for p in t["predictions"] if p["model_version"] == version]
            for t in client.tasks(project_id)}


def _assert_exactly_once(client: LabelStudioClient, project_id: int, task_ids: list[int], version: str,
                         seed: int = 0) -> None:
    held = _held(client, project_id, version)
    counts = {t: len(held[t]) for t in task_ids}
    assert all(n == 1 for n in counts.values()), {t: n for t, n in counts.items() if n != 1}
    for t in task_ids:  # and the one there is the one queued
        assert np.array_equal(result_to_mask(held[t][0]["result"][0]), _mask(t + seed)), t


def _states(sessions: Any, version: str | None = None) -> dict[str, int]:
    query = select(Row.state, func.count()).group_by(Row.state)
    if version is not None:
        query = query.where(Row.model_version == version)
    with sessions() as session:
        return {s: int(n) for s, n in session.execute(query)}


# -- many deliverers -----------------------------------------------------------------------------------

class Crash(BaseException):
    """A deliverer dying right after its request was answered, before it wrote anything."""


class CrashingClient(LabelStudioClient):
    def import_predictions(self, project_id: int, predictions: Any) -> int:
        sent = super().import_predictions(project_id, predictions)
        raise Crash(sent)


class DeadOutbox(Outbox):
    def _release(self, token: str, ids: list[int]) -> None:
        """A dead process releases nothing: its rows wait for their lease to expire."""


def _run(outbox: Outbox, reports: list[Any], k: int, crashed: list[BaseException], delay: float) -> None:
    time.sleep(delay)
    try:
        reports[k] = outbox.deliver(wait=20)
    except Crash as err:
        crashed.append(err)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_deliverer_threads_racing_on_the_same_rows_send_each_once(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, database: str, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    """10 seeded trials: 3 deliverers (threads, each with its own engine and Outbox) start together
    on the same 16 queued predictions, with random chunk sizes (1-9) and start jitter; in every
    third trial one of them dies right after a request was answered, leaving its rows `sending`
    under a 2 s lease for the others to check against Label Studio and take over."""
    url = _database(database, request, tmp_path)
    project_id, task_ids = _tasks(ls_client, f"race {database}", 16)
    rng = random.Random(11)
    for trial in range(10):
        version = f"race-{trial}"
        engines = [make_engine(url) for _ in range(3)]
        sessions = [make_session_factory(e) for e in engines]
        _queue(sessions[0], ls_client.url, project_id, task_ids, version, seed=trial)
        crash = trial % 3 == 1
        outboxes = [(DeadOutbox if crash and k == 0 else Outbox)(
            sessions[k], CrashingClient(ls_client.url, ls_client.token) if crash and k == 0 else ls_client,
            chunk_size=rng.randint(1, 9), lease_seconds=2) for k in range(3)]
        reports: list[Any] = [None] * 3
        crashed: list[BaseException] = []

        threads = [threading.Thread(target=_run, args=(outboxes[k], reports, k, crashed, rng.random() * 0.05))
                   for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)
        assert len(crashed) == crash
        survivors = [r for r in reports if r is not None]
        assert all(r.error is None and r.pending == 0 for r in survivors), survivors
        # Each row counted delivered by exactly one deliverer; the dead one counted none.
        assert sum(r.delivered for r in survivors) == len(task_ids), (trial, survivors)
        assert _states(sessions[0], version) == {"delivered": len(task_ids)}
        _assert_exactly_once(ls_client, project_id, task_ids, version, seed=trial)
        for engine in engines:
            engine.dispose()


def _cli_env(label_studio: LocalLabelStudio, url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_DATABASE_URL": url,
            "XDLABEL_LS_URL": label_studio.url, "XDLABEL_LS_TOKEN": label_studio.token, **extra}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_deliverer_processes_with_label_studio_killed_mid_delivery(
        ls_client: LabelStudioClient, label_studio: LocalLabelStudio, database: str, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    """Two `xdlabel labelstudio deliver` processes push 300 queued predictions in chunks of 5;
    Label Studio is SIGKILLed once (seeded: after 15-150 rows are delivered, so possibly in the
    middle of a request) and restarted after a random 0-1 s. Afterwards every task holds exactly
    one prediction of that version, every row is delivered, and the two processes' reports
    add up to 300 delivered (no row counted twice)."""
    url = _database(database, request, tmp_path)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    project_id, task_ids = _tasks(ls_client, f"kill {database}", 300)
    _queue(sessions, label_studio.url, project_id, task_ids, "kill-v1")
    rng = random.Random(f"kill-{database}")
    kill_after, down_for = rng.randint(15, 150), rng.random()
    env = _cli_env(label_studio, url, tmp_path, XDLABEL_LS_CHUNK_SIZE="5")
    cli = [sys.executable, "-m", "xdlabel.cli", "labelstudio", "deliver", "--wait", "90", "--json"]
    procs = [subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while _states(sessions).get("delivered", 0) < kill_after and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_at = _states(sessions).get("delivered", 0)
        label_studio.stop(sig=9)
        time.sleep(down_for)
        label_studio.start()
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert 0 < killed_at < 300, killed_at  # the kill did land mid-delivery
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outputs]
    assert sum(r["delivered"] for r in reports) == 300, reports
    assert all(r["failed"] == 0 and r["pending"] == 0 for r in reports)
    assert _states(sessions) == {"delivered": 300}
    _assert_exactly_once(ls_client, project_id, task_ids, "kill-v1")
    engine.dispose()


# -- answers by kind -----------------------------------------------------------------------------------

def test_a_refused_token_stops_delivery_and_keeps_the_rows(ls_client: LabelStudioClient,
                                                           label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    """A wrong token (401): `xdlabel labelstudio deliver` stops at once, exit 2, with a message
    naming the setting; every row stays pending (none failed, none sent); with the right token
    all are delivered, once."""
    url = _sqlite(tmp_path)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    project_id, task_ids = _tasks(ls_client, "auth", 12)
    _queue(sessions, label_studio.url, project_id, task_ids, "auth-v1")
    env = _cli_env(label_studio, url, tmp_path, XDLABEL_LS_TOKEN="wrong-token-0123456789", XDLABEL_LS_CHUNK_SIZE="5")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "labelstudio", "deliver", "--wait", "60", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30  # at once: not retried for the 60 s it could wait
    assert "refused the token (401" in done.stderr and "XDLABEL_LS_TOKEN" in done.stderr
    assert json.loads(done.stdout)["pending"] == 12 and json.loads(done.stdout)["requests"] == 1
    assert _states(sessions) == {"pending": 12}
    assert all(v == [] for v in _held(ls_client, project_id, "auth-v1").values())
    report = Outbox(sessions, ls_client).deliver()
    assert (report.delivered, report.failed, report.pending, report.error) == (12, 0, 0, None)
    _assert_exactly_once(ls_client, project_id, task_ids, "auth-v1")
    engine.dispose()


class FlakyProxy:
    """A proxy on 127.0.0.1 in front of Label Studio that answers the first requests itself with
    the given statuses (429 with a Retry-After, 503), then forwards everything."""

    def __init__(self, target: str, answers: list[tuple[int, dict[str, str]]]) -> None:
        self.target, self.answers, self.refused, self.forwarded = target, list(answers), 0, 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    answer = proxy.answers.pop(0) if proxy.answers else None
                    proxy.refused += answer is not None
                    proxy.forwarded += answer is None
                if answer is not None:
                    self.send_response(answer[0])
                    for k, v in answer[1].items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                response = httpx.request(self.command, proxy.target + self.path, headers=headers, content=body,
                                         timeout=60)
                self.send_response(response.status_code)
                for k, v in response.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_429_and_503_are_retried_and_delivered_once(ls_client: LabelStudioClient, label_studio: LocalLabelStudio,
                                                    tmp_path: Path) -> None:
    """The first 5 requests are answered 429 (Retry-After: 1, then 3600, cut to 1.5 s), 503, 503,
    429 (Retry-After: 1), whatever they were (bulk sends or the checks after a 503). Delivery
    retries with backoff, honours Retry-After, and every prediction arrives exactly once."""
    url = _sqlite(tmp_path)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    project_id, task_ids = _tasks(ls_client, "flaky", 20)
    answers = [(429, {"Retry-After": "1"}), (429, {"Retry-After": "3600"}), (503, {}), (503, {}),
               (429, {"Retry-After": "1"})]
    with FlakyProxy(label_studio.url, answers) as proxy:
        client = LabelStudioClient(proxy.url, label_studio.token)
        client.max_retry_after = 1.5
        _queue(sessions, proxy.url, project_id, task_ids, "flaky-v1")
        started = time.monotonic()
        report = Outbox(sessions, client, chunk_size=10, backoff=0.1).deliver(wait=30)
        elapsed = time.monotonic() - started
    assert proxy.refused == 5 and proxy.forwarded >= 2
    assert (report.delivered, report.failed, report.pending, report.error) == (20, 0, 0, None)
    assert elapsed >= 1 + 1.5 + 1  # the Retry-After waits (capped) were kept
    assert elapsed < 30  # and 3600 s was not
    _assert_exactly_once(ls_client, project_id, task_ids, "flaky-v1")
    engine.dispose()


def test_a_deleted_task_fails_alone_requeue_and_force(ls_client: LabelStudioClient, label_studio: LocalLabelStudio,
                                                      tmp_path: Path) -> None:
    """A task deleted in Label Studio: only its row fails (with the reason), the other 7 go out in
    bulk. `xdlabel labelstudio requeue` puts it back to pending (it fails again: the task is still
    gone). A forced redo of a delivered task replaces its prediction: Label Studio ends with exactly
    one prediction of that version for it, the new one."""
    url = _sqlite(tmp_path)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    project_id, task_ids = _tasks(ls_client, "deleted", 8)
    deleted = task_ids[5]
    ls_client.sdk.tasks.delete(id=str(deleted))
    _queue(sessions, label_studio.url, project_id, task_ids, "del-v1")
    report = Outbox(sessions, ls_client).deliver()
    assert (report.delivered, report.failed, report.pending) == (7, 1, 0)
    with sessions() as session:
        failed = session.scalar(select(Row).where(Row.state == "failed"))
    assert failed is not None and failed.task_id == deleted and "400" in (failed.error or "")
    alive = [t for t in task_ids if t != deleted]
    _assert_exactly_once(ls_client, project_id, alive, "del-v1")

    env = _cli_env(label_studio, url, tmp_path)
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "labelstudio", "requeue", "--project",
                           str(project_id), "--task", str(deleted), str(alive[0]), "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"requeued": 1}  # the failed one; the delivered one is left alone
    assert _states(sessions) == {"delivered": 7, "pending": 1}
    again = Outbox(sessions, ls_client).deliver()
    assert (again.delivered, again.failed) == (0, 1)
    with sessions() as session:
        assert session.get(Row, failed.id).attempts == 2  # type: ignore[union-attr]

    redo = alive[2]
    old_id = _held(ls_client, project_id, "del-v1")[redo][0]["id"]
    with sessions() as session:
        assert enqueue(session, label_studio.url, [Outgoing(project_id, redo, {
            "result": [brush_result(_mask(999), "Ball", "mask", "image")], "model_version": "del-v1"},
            replace=True)]) == 1
        session.commit()
    forced = Outbox(sessions, ls_client).deliver()
    assert (forced.delivered, forced.failed, forced.pending) == (1, 0, 0)
    (now,) = _held(ls_client, project_id, "del-v1")[redo]
    assert now["id"] != old_id and np.array_equal(result_to_mask(now["result"][0]), _mask(999))
    _assert_exactly_once(ls_client, project_id, [t for t in alive if t != redo], "del-v1")
    engine.dispose()


# -- prelabel: one bad task fails alone ------------------------------------------------------------------

def _no_names(host: Any, *args: Any, **kwargs: Any) -> Any:
    """A resolver that knows no name: what a host that does not resolve gets (no DNS query leaves)."""
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_prelabel_fails_unreadable_tasks_alone_and_force_redoes_one(
        label_studio: LocalLabelStudio, parity_model: Any, tmp_path: Path) -> None:
    """Three tasks with readable images, one whose upload is missing (Label Studio answers an
    error for the file), one whose URL host does not resolve: those two fail with their task ids
    and reasons (the foreign one not blamed on Label Studio), the three are predicted and
    delivered. Then `force` on one task predicts it again and replaces its prediction."""
    ls_client = LabelStudioClient(label_studio.url, label_studio.token)
    ls_client.fetcher.resolver = _no_names  # Label Studio itself is an address, never looked up
    no_such_host = "no-such-host.invalid"
    predictor = Predictor(parity_model, settings=PredictorSettings(short_side=128, caption_steps=8))
    url = _sqlite(tmp_path)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    images = make_images(tmp_path / "photos", 3)
    project = ls_client.sdk.projects.create(title="prelabel faults", label_config=CONFIG)
    folder = label_studio.files_root / "prelabel-faults"
    folder.mkdir(parents=True)
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    ls_client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    good = ls_client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d=prelabel-faults/{p.name}"}} for p in images]).task_ids
    missing, foreign = ls_client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": "/data/upload/999999/missing.png"}},
        {"data": {"image": f"http://{no_such_host}/cat.png"}}]).task_ids
    options = PrelabelOptions(batch_size=2, task="semantic", default_threshold=0.0)
    report = prelabel_project(predictor, ls_client, sessions, project.id, "pf-v1", options)
    assert sorted(report.failed) == sorted([missing, foreign]), report.failed
    assert "missing.png" in report.failed[missing]
    assert no_such_host in report.failed[foreign] and "Label Studio" not in report.failed[foreign]
    assert (report.predicted, report.delivery.delivered, report.delivery.pending) == (3, 3, 0)
    held = _held(ls_client, project.id, "pf-v1")
    assert all(len(held[t]) == 1 for t in good) and held[missing] == held[foreign] == []

    # A second run skips the three; a forced run on one task predicts it again and replaces it.
    again = prelabel_project(predictor, ls_client, sessions, project.id, "pf-v1", options)
    assert (again.predicted, again.skipped) == (0, 3)
    redo = good[1]
    forced = prelabel_project(predictor, ls_client, sessions, project.id, "pf-v1", PrelabelOptions(
        batch_size=2, task="semantic", default_threshold=0.0, force=True, task_ids=frozenset({redo})))
    assert (forced.tasks, forced.predicted, forced.failed, forced.delivery.delivered) == (1, 1, {}, 1)
    after = _held(ls_client, project.id, "pf-v1")
    assert len(after[redo]) == 1 and after[redo][0]["id"] != held[redo][0]["id"]
    assert after[redo][0]["result"] == held[redo][0]["result"]  # same model, same image: same prediction
    assert all(after[t] == held[t] for t in good if t != redo)
    engine.dispose()


def _enqueue_all(engine: Any, order: list[Outgoing], size: int, added: list[int], errors: list[BaseException]) -> None:
    try:
        with make_session_factory(engine)() as session:
            for start in range(0, len(order), size):
                added.append(enqueue(session, "http://ls", order[start:start + size]))
                session.commit()
    except BaseException as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


def test_concurrent_enqueuers_never_fail(migrated_url: str) -> None:
    """5 seeded trials: 4 threads (each its own engine) enqueue the same 40 predictions at once, in
    shuffled order and transactions of random size. No enqueuer fails, each prediction is stored
    once, and the counts they report as new add up to 40."""
    rng = random.Random(5)
    for trial in range(5):
        version = f"enq-{trial}"
        items = [Outgoing(1, t, {"result": [], "score": 0.1, "model_version": version}) for t in range(40)]
        engines = [make_engine(migrated_url) for _ in range(4)]
        added: list[int] = []
        errors: list[BaseException] = []

        threads = [threading.Thread(target=_enqueue_all, args=(e, rng.sample(items, len(items)), rng.randint(1, 15),
                                                               added, errors)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and sum(added) == 40, (errors, added)
        with make_session_factory(engines[0])() as session:
            stored = session.execute(select(Row.task_id, func.count()).where(Row.model_version == version)
                                     .group_by(Row.task_id)).all()
        assert sorted(stored) == [(t, 1) for t in range(40)]
        for engine in engines:
            engine.dispose()

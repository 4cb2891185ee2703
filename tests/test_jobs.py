"""Jobs under leases: exclusive claims, heartbeats, fencing, takeover of dead workers, clean shutdown,
cancellation, the API.

Real parts throughout: SQLite and PostgreSQL, `xdlabel worker` processes killed with SIGKILL, frozen
with SIGSTOP or asked to stop with SIGTERM, and an image server on 127.0.0.1 whose downloads drip
slowly or hang.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from index.db import make_engine, make_session_factory, upgrade
from index.models import Job
from tests.faultkit import wait_for
from tests.test_api import make_images
from xdlabel import jobs
from xdlabel.services import Services
from xdlabel.settings import Settings

LIVE = ("queued", "running", "cancelling")


def row(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def job_when(sessions: sessionmaker[Session], job_id: int, ok: Callable[[Job], bool], timeout: float, what: str,
             every: float = 0.05) -> Job:
    """The job's row once ``ok`` holds for it."""
    return wait_for(lambda: (lambda job: job if ok(job) else None)(row(sessions, job_id)), timeout, what, every)


def db_now(session: Session) -> datetime:
    """Now on the clock leases are measured on (the database's on PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return jobs.aware(session.scalar(select(func.clock_timestamp())))  # type: ignore[arg-type]
    return jobs.now()


# -- claiming: randomized contention between threads of several processes -------------------------

def _holder(url: str, name: str, seed: int, lease: float, out: list[dict[str, Any]]) -> None:
    """Claims until no job is left; each claim is then (at random) abandoned at once (the holder
    'dies'), renewed a few times and abandoned, or renewed and finished."""
    engine = make_engine(url)
    sessions, dialect, rng = make_session_factory(engine), engine.dialect.name, random.Random(seed)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sessions() as s:
            job = jobs.claim(s, name, lease)
            if job is None:
                if not s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(LIVE))):
                    break
                time.sleep(0.01)
                continue
        assert job.heartbeat_at is not None and job.lease_expires_at is not None
        lease_ = jobs.Lease(sessions, dialect, job.id, job.lease_token, lease)
        event = {"job": job.id, "token": job.lease_token, "by": name, "claimed_at": jobs.aware(job.heartbeat_at),
                 "expires": jobs.aware(job.lease_expires_at), "finished": False}
        roll = rng.random()
        if roll > 0.3:
            for _ in range(rng.randint(0, 2)):
                time.sleep(lease * rng.uniform(0.1, 0.4))
                if not lease_.renew():  # this machine stalled us past the lease, and it was taken
                    break
                with sessions() as s:
                    event["expires"] = jobs.aware(s.scalar(select(Job.lease_expires_at).where(
                        Job.id == job.id, Job.lease_token == job.lease_token)))  # type: ignore[arg-type]
            if roll > 0.55:
                event["finished"] = lease_.finish("done")
        out.append(event)
    engine.dispose()


def _holders_process(url: str, tag: str, seed: int, lease: float, trials: int, threads: int,
                     barrier: Any, results: Any) -> None:
    for trial in range(trials):
        barrier.wait()
        events: list[dict[str, Any]] = []
        workers = [threading.Thread(target=_holder, args=(url, f"{tag}t{k}", seed * 1000 + trial * 10 + k,
                                                          lease, events)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results.put((trial, events))
        barrier.wait()


def test_each_job_has_one_live_lease_holder_at_a_time(migrated_url: str) -> None:
    """10 seeded trials; in each, 2-4 jobs (queued, or left running or cancelling by a dead worker with a
    lapsed lease) are contended for by 6 holders: 3 threads in each of 2 processes, which at random
    die holding a lease (it must lapse before anyone else gets the job), renew it, or finish the job.
    Checked: every claim got its own token (+1 each), each lease began only after the previous one
    expired, exactly one holder finished each job (the last one), dead workers' cancelling jobs end
    cancelled without being run."""
    trials, processes, threads, lease = 10, 2, 3, 0.25
    context = multiprocessing.get_context("fork")  # before this process opens a connection
    barrier, results = context.Barrier(processes + 1), context.Queue()
    procs = [context.Process(target=_holders_process, daemon=True,
                             args=(migrated_url, f"p{p}", p, lease, trials, threads, barrier, results))
             for p in range(processes)]
    for p in procs:
        p.start()
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)
    try:
        for trial in range(trials):
            rng = random.Random(trial)
            initial: dict[int, tuple[str, int]] = {}
            with sessions() as s:
                lapsed = jobs.now() - timedelta(seconds=5)
                for _ in range(rng.randint(2, 4)):
                    state = rng.choices(["queued", "running", "cancelling"], [6, 2, 2])[0]
                    token = 0 if state == "queued" else rng.randint(1, 3)
                    job = Job(kind="ingest", params={"trial": trial}, state=state, lease_token=token,
                              lease_expires_at=None if state == "queued" else lapsed, worker="dead")
                    s.add(job)
                    s.flush()
                    initial[job.id] = (state, token)
                s.commit()
            barrier.wait()  # go
            barrier.wait()  # all done
            events = [e for _ in range(processes) for e in results.get(timeout=60)[1]]
            with sessions() as s:
                final = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(initial)))}
            for job_id, (state, token) in initial.items():
                claims = sorted((e for e in events if e["job"] == job_id), key=lambda e: e["token"])
                if state == "cancelling":
                    assert claims == [] and final[job_id].state == "cancelled", (trial, job_id, claims)
                    continue
                assert [e["token"] for e in claims] == list(range(token + 1, token + 1 + len(claims))), claims
                for before, after in zip(claims, claims[1:], strict=False):
                    assert after["claimed_at"] >= before["expires"], (trial, before, after)
                assert [e["finished"] for e in claims] == [False] * (len(claims) - 1) + [True], (trial, claims)
                assert final[job_id].state == "done" and final[job_id].lease_token == claims[-1]["token"]
                assert final[job_id].worker == claims[-1]["by"]
    finally:
        engine.dispose()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


# -- leases in one process: heartbeat, fencing, cancellation ----------------------------------------

def test_a_beating_lease_holds_and_a_stalled_one_is_fenced_out(migrated_url: str, tmp_path: Path) -> None:
    """Worker 1's heartbeat holds its job through 5 lease periods against a claimer trying every 50 ms;
    then worker 1 stalls (its heartbeat stops), worker 2 takes over, writes progress and finishes the
    job 'done'; worker 1, back, can write neither progress nor 'failed' (0 rows): the job stays done."""
    lease = 0.4
    services = Services(Settings(data_dir=tmp_path, database_url=migrated_url))
    dialect = services.engine.dialect.name
    with services.sessions() as s:
        job_id = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"}).id
        first = jobs.claim(s, "w1", lease)
    assert first is not None and first.lease_token == 1
    one = jobs.Lease(services.sessions, dialect, job_id, first.lease_token, lease).start()
    assert one.write(total=3, done=1)
    until = time.monotonic() + 5 * lease
    while time.monotonic() < until:
        with services.sessions() as s:
            assert jobs.claim(s, "w2", lease) is None, "taken while its holder was beating"
            expires = s.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
            assert expires is not None and jobs.aware(expires) > db_now(s)
        time.sleep(0.05)
    one.stop()  # stalled: no more beats
    with services.sessions() as s:
        second = wait_for(lambda: jobs.claim(s, "w2", lease), 3 * lease, "takeover after the lease lapsed")
    assert second.id == job_id and second.lease_token == 2 and second.worker == "w2"
    two = jobs.Lease(services.sessions, dialect, job_id, second.lease_token, lease).start()
    assert not one.write(done=2), "a superseded holder wrote progress"
    assert one.lost.is_set() and one.should_stop()
    assert two.write(done=3) and two.finish("done")
    two.stop()
    assert not one.write(done=99)
    assert not one.finish("failed", "late")
    assert one.settle() is None
    final = row(services.sessions, job_id)
    assert (final.state, final.done, final.total, final.error, final.worker) == ("done", 3, 3, None, "w2")
    services.engine.dispose()


def test_the_heartbeat_outlives_dropped_database_connections(postgres_url: str, tmp_path: Path) -> None:
    """Every 0.5 s for 3 lease periods (2 s each), every other connection to the PostgreSQL database is
    terminated (pg_terminate_backend): the heartbeat's renewals fail on a dead connection and are
    retried on a fresh one, so the lease never lapses, no claimer gets the job and it is not lost."""
    lease = 2.0
    upgrade(postgres_url)
    services = Services(Settings(data_dir=tmp_path, database_url=postgres_url))
    killer, claimer = make_engine(postgres_url), make_engine(postgres_url)
    claims = make_session_factory(claimer)
    with services.sessions() as s:
        job_id = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"}).id
        job = jobs.claim(s, "holder", lease)
    assert job is not None
    holder = jobs.Lease(services.sessions, "postgresql", job_id, job.lease_token, lease).start()
    try:
        killed, until = 0, time.monotonic() + 3 * lease
        while time.monotonic() < until:
            with killer.connect() as conn:
                killed += len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).all())
            with claims() as s:
                assert jobs.claim(s, "thief", lease) is None, "taken while its holder was alive"
            time.sleep(0.5)
        assert killed >= 6 and not holder.lost.is_set()
        with claims() as s:
            expires = s.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
            assert expires is not None and jobs.aware(expires) > db_now(s)
        assert holder.finish("done")
    finally:
        holder.stop()
        for engine in (killer, claimer, services.engine):
            engine.dispose()


def test_a_dead_workers_cancelling_job_ends_cancelled(migrated_url: str, tmp_path: Path) -> None:
    """A job cancelled while its worker is dead (no heartbeat) is settled 'cancelled' by the next claim,
    which takes the next job instead; the dead worker cannot flip it; cancelling a finished job
    changes nothing."""
    lease = 0.3
    services = Services(Settings(data_dir=tmp_path, database_url=migrated_url))
    dialect = services.engine.dialect.name
    with services.sessions() as s:
        doomed = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"}).id
        other = jobs.submit(s, "ingest", {"sources": ["y"], "dataset": "d"}).id
        dead = jobs.claim(s, "dead", lease)
        assert dead is not None and dead.id == doomed
        assert jobs.cancel(s, doomed).state == "cancelling"  # type: ignore[union-attr]
        live = jobs.claim(s, "live", lease)  # the other job: the doomed one's lease still holds
        assert live is not None and live.id == other
        holder = jobs.Lease(services.sessions, dialect, other, live.lease_token, lease).start()
        assert row(services.sessions, doomed).state == "cancelling"
        time.sleep(lease + 0.1)
        assert jobs.claim(s, "late", lease) is None  # nothing to run: the doomed job is settled on the way
    settled = row(services.sessions, doomed)
    assert settled.state == "cancelled" and settled.finished_at is not None and settled.lease_token == 2
    assert not jobs.Lease(services.sessions, dialect, doomed, 1, lease).finish("done")
    assert row(services.sessions, doomed).state == "cancelled"
    assert holder.finish("done")
    holder.stop()
    with services.sessions() as s:
        assert jobs.cancel(s, other).state == "done"  # type: ignore[union-attr]
    services.engine.dispose()


def test_cancel_and_shutdown_stop_a_job_after_a_batch_and_a_rerun_resumes_it(migrated_url: str,
                                                                             tmp_path: Path) -> None:
    """Cancelling a running job stops it after a batch and settles it cancelled. A worker shutting
    down (its stop event, which SIGTERM sets) stops after a batch and puts the job back in the queue
    with its lease released; the next claim (token 2) resumes it, and the counters come out right: the
    images stored by the first run count as done, the broken file it stored as failed counts as failed
    again, with its reason."""
    services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64,
                                 caption_steps=1))
    # 12 images in batches of 2: the shutdown watcher polls the job's progress, and a loaded CPU once let a
    # run of 6 images finish before the watcher saw its first batch
    make_images(tmp_path / "photos", 12)
    (tmp_path / "photos" / "a_broken.png").write_bytes(b"nope")  # listed first: fails in the first batch
    with services.sessions() as s:
        job_id = jobs.submit(s, "ingest", {"sources": [str(tmp_path / "photos")], "dataset": "c",
                                           "batch_size": 2}).id
        job = jobs.claim(s, "me")
        assert job is not None
        assert jobs.cancel(s, job_id).state == "cancelling"  # type: ignore[union-attr]
    assert jobs.run(services, job) == "cancelled"
    cancelled = row(services.sessions, job_id)
    assert cancelled.total == 13 and 0 < cancelled.done + cancelled.failed < 13 and cancelled.lease_expires_at is None
    with services.sessions() as s:
        queued = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"})
        assert jobs.cancel(s, queued.id).state == "cancelled"  # type: ignore[union-attr]
        job_id = jobs.submit(s, "ingest", {"sources": [str(tmp_path / "photos")], "dataset": "r",
                                           "batch_size": 2}).id
        job = jobs.claim(s, "first")
    assert job is not None and job.id == job_id
    shutdown = threading.Event()

    def stop_after_a_batch() -> None:
        job_when(services.sessions, job_id, lambda j: j.done + j.failed > 0, 60, "a batch", every=0.01)
        shutdown.set()

    watcher = threading.Thread(target=stop_after_a_batch)
    watcher.start()
    assert jobs.run(services, job, shutdown=shutdown) == "queued"
    watcher.join()
    released = row(services.sessions, job_id)
    assert released.state == "queued" and released.lease_expires_at is None and released.failed == 1
    assert released.done + released.failed < 13
    with services.sessions() as s:
        again = jobs.claim(s, "second")
    assert again is not None and again.id == job_id and again.lease_token == 2
    assert jobs.run(services, again) == "done"
    final = row(services.sessions, job_id)
    assert (final.state, final.total, final.done, final.failed, final.worker) == ("done", 13, 12, 1, "second")
    assert [e["uri"] for e in final.errors] == [(tmp_path / "photos" / "a_broken.png").as_uri()]
    assert "not a readable image" in final.errors[0]["reason"]
    services.engine.dispose()


# -- worker processes: an image server, kill -9, SIGSTOP, SIGTERM ----------------------------------

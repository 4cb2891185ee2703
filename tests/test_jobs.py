"""Jobs in SQL: safe claiming by several workers, stale takeover, progress, cancellation, the API."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import update

from index.models import Job
from tests.test_api import Server, make_images
from xdlabel import jobs
from xdlabel.api.auth import create_api_key
from xdlabel.services import Services
from xdlabel.settings import Settings


def test_only_one_worker_claims_a_job(migrated_url: str, tmp_path: Path) -> None:
    services = Services(Settings(data_dir=tmp_path, database_url=migrated_url))
    with services.sessions() as s:
        job_id = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"}).id
    won: list[int] = []
    barrier = threading.Barrier(4)

    def contend() -> None:
        barrier.wait()
        with services.sessions() as s:
            job = jobs.claim(s, f"w{threading.get_ident()}")
            if job is not None:
                won.append(job.id)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == [job_id]
    with services.sessions() as s:
        assert jobs.claim(s, "late") is None  # running and beating: nobody else takes it
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=jobs.now() - timedelta(minutes=10)))
        s.commit()
        taken = jobs.claim(s, "rescuer")  # its worker died: taken over
        assert taken is not None and taken.id == job_id and taken.worker == "rescuer"
    services.engine.dispose()


def test_cancelling_a_running_job_stops_it_after_a_batch(migrated_url: str, tmp_path: Path) -> None:
    services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=96))
    make_images(tmp_path / "photos", 6)
    with services.sessions() as s:
        job_id = jobs.submit(s, "ingest", {"sources": [str(tmp_path / "photos")], "dataset": "c",
                                           "batch_size": 2}).id
        job = jobs.claim(s, "me")
        assert job is not None
        assert jobs.cancel(s, job_id).state == "cancelling"  # type: ignore[union-attr]
    assert jobs.run(services, job) == "cancelled"
    with services.sessions() as s:
        done = s.get(Job, job_id)
        assert done is not None and done.state == "cancelled" and 0 < done.done < 6 and done.total == 6
        queued = jobs.submit(s, "ingest", {"sources": ["x"], "dataset": "d"})
        assert jobs.cancel(s, queued.id).state == "cancelled"  # type: ignore[union-attr]
    services.engine.dispose()


def test_jobs_over_http_run_by_a_worker_process(migrated_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    services = Services(Settings(data_dir=data, database_url=migrated_url, short_side=96))
    make_images(tmp_path / "photos", 5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"nope")
    with services.sessions() as s:
        key = create_api_key(s, "jobs")
    with Server(services) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        r = client.post("/v1/jobs", json={"dataset": "web", "sources": [str(tmp_path / "photos")], "tags": ["t"]})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] == "queued"
        assert client.post("/v1/jobs", json={"dataset": "web", "sources": []}).status_code == 422
        assert client.post("/v1/jobs", json={"kind": "train", "dataset": "x", "sources": ["y"]}).status_code == 400
        env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_DATABASE_URL": migrated_url,
               "XDLABEL_SHORT_SIDE": "96"}
        worker = subprocess.run([sys.executable, "-m", "xdlabel.cli", "worker", "--once"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0 and "ran 1 jobs" in worker.stdout, worker.stderr
        status = client.get(f"/v1/jobs/{job['id']}").json()
        assert status["state"] == "done" and status["total"] == 6
        assert (status["done"], status["failed"]) == (5, 1)
        assert status["images_per_s"] > 0 and status["eta_s"] is None
        error = status["errors"][0]
        assert error["uri"].endswith("broken.jpg") and "not a readable image" in error["reason"]
        assert [j["id"] for j in client.get("/v1/jobs").json()] == [job["id"]]
        assert client.get("/v1/jobs/999").status_code == 404
    services.engine.dispose()

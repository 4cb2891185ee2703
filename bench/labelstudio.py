"""Pushing predictions to a real Label Studio: bulk (xdlabel's outbox) against one request per prediction.

Starts Label Studio 1.23.2 from .venv-labelstudio (installed on first use) on a free port, creates a
project with --tasks tasks, and pushes one prediction per task (a brush mask of a few blobs plus a
caption, as xdlabel makes them) three ways, in the same run:
  1. xdlabel's outbox: SQL rows -> bulk import in chunks (what `xdlabel prelabel` does);
  2. the same chunks straight through the SDK's bulk import (no outbox), for the outbox's overhead;
  3. one `predictions.create` request per prediction (the baseline; timed on --single of them).
Prints a table; not a test.

    python bench/labelstudio.py [--tasks 1000] [--single 100] [--chunk 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from annotator.client import LabelStudioClient
from annotator.convert import brush_result, caption_result
from annotator.localserver import LocalLabelStudio, ensure_virtualenv
from annotator.outbox import Outbox, Outgoing, enqueue
from index.db import make_engine, make_session_factory, upgrade

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="blob"/></BrushLabels>
<TextArea name="caption" toName="image"/></View>"""


def prediction(seed: int, version: str) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:240, :320]
    mask = np.zeros((240, 320), bool)
    for cy, cx, r in zip(rng.integers(30, 210, 4), rng.integers(30, 290, 4), rng.integers(10, 40, 4), strict=True):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    return {"result": [brush_result(mask, "blob", "mask", "image", 0.8), caption_result("blobs", "caption", "image")],
            "score": 0.8, "model_version": version}


def new_project(client: LabelStudioClient, title: str, n: int) -> tuple[int, list[int]]:
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    ids = client.sdk.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"http://127.0.0.1:9/{i}.png"}} for i in range(n)]).task_ids
    return project.id, list(ids)


def count(client: LabelStudioClient, project_id: int, version: str) -> int:
    return sum(p["model_version"] == version for t in client.tasks(project_id) for p in t["predictions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="predictions pushed one request each")
    parser.add_argument("--chunk", type=int, default=200, help="predictions per bulk request")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalLabelStudio(ensure_virtualenv(repo / ".venv-labelstudio"), Path(tmp) / "ls")
        server.start()
        try:
            client = LabelStudioClient(server.url, server.token)
            rows = []

            # 1. the outbox
            project_id, task_ids = new_project(client, "bench outbox", args.tasks)
            url = f"sqlite:///{tmp}/xdlabel.db"
            upgrade(url)
            engine = make_engine(url)
            sessions = make_session_factory(engine)
            payloads = {t: prediction(t, "bench-outbox") for t in task_ids}
            start = time.perf_counter()
            with sessions() as session:
                enqueue(session, client.url, [Outgoing(project_id, t, payloads[t]) for t in task_ids])
                session.commit()
            report = Outbox(sessions, client, chunk_size=args.chunk).deliver()
            seconds = time.perf_counter() - start
            assert report.delivered == args.tasks and count(client, project_id, "bench-outbox") == args.tasks
            rows.append(("xdlabel outbox (SQL + bulk)", args.tasks, report.requests, seconds))
            engine.dispose()

            # 2. bulk through the SDK, no outbox
            project_id, task_ids = new_project(client, "bench bulk", args.tasks)
            payloads = {t: prediction(t, "bench-bulk") for t in task_ids}
            start = time.perf_counter()
            requests = 0
            for i in range(0, len(task_ids), args.chunk):
                client.import_predictions(project_id, [{"task": t, **payloads[t]} for t in task_ids[i:i + args.chunk]])
                requests += 1
            seconds = time.perf_counter() - start
            assert count(client, project_id, "bench-bulk") == args.tasks
            rows.append(("SDK bulk import, no outbox", args.tasks, requests, seconds))

            # 3. one request per prediction
            project_id, task_ids = new_project(client, "bench single", args.single)
            payloads = {t: prediction(t, "bench-single") for t in task_ids}
            start = time.perf_counter()
            for t in task_ids:
                p = payloads[t]
                client.sdk.predictions.create(task=t, result=p["result"], score=p["score"],
                                              model_version=p["model_version"])
            seconds = time.perf_counter() - start
            assert count(client, project_id, "bench-single") == args.single
            rows.append(("one request per prediction", args.single, args.single, seconds))
        finally:
            server.stop()

    baseline = rows[-1][1] / rows[-1][3]
    print(f"\nLabel Studio 1.23.2 on 127.0.0.1; 320x240 brush mask + caption per prediction; chunk {args.chunk}")
    print(f"{'method':<30} {'predictions':>11} {'requests':>9} {'seconds':>8} {'pred/s':>8} {'speed-up':>9}")
    for name, n, requests, seconds in rows:
        rate = n / seconds
        print(f"{name:<30} {n:>11} {requests:>9} {seconds:>8.2f} {rate:>8.1f} {rate / baseline:>8.1f}x")


if __name__ == "__main__":
    main()

"""The README's "Label Studio for teams" walkthrough, timed: from no server to an exported COCO file.

Starts a fresh Label Studio 1.23.2 from .venv-labelstudio on a free port, creates a project with the
README's walkthrough config (CONFIG below; tests/test_ls_labels.py checks the README shows this
one) and a local files storage holding --tasks synthetic shape scenes, synced into tasks as the
storage's "Sync" button does, then runs the commands a team runs, as processes, with the bundled model:

  1. xdlabel prelabel --project P                 (model load + predictions + bulk push)
  2. xdlabel prelabel --project P                 (again: nothing to do, every task skipped)
  3. xdlabel prelabel --project P --force --task-id T   (redo one task: its prediction replaced)
  4. predictions accepted as annotations in Label Studio (the Data Manager's action)
  5. xdlabel export --project P --format coco     (live, from Label Studio)

and prints the time of each step (wall, and CPU for the xdlabel commands), the machine (CPUs, load
average before and after) and the date, the per-label summary of step 1 and what the COCO file holds. Not a test.

    python bench/ls_walkthrough.py [--tasks 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio, ensure_virtualenv
from xdecoder.training.synthetic import make_scenes

REPO = Path(__file__).resolve().parents[1]
# The README's config in the bundled model's words (it knows shapes and four kinds of ground).
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.5">
    <Label value="Ball" predicted_values="circle"/>
    <Label value="Sky" stuff="true"/><Label value="Grass" stuff="true"/>
    <Label value="Sand" stuff="true"/><Label value="Water" stuff="true"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Box" predicted_values="square"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Box" predicted_values="square"/>
    <Label value="Triangle" model_score_threshold="0.6"/></RectangleLabels>
  <TextArea name="caption" toName="image"/>
  <TextArea name="prompt" toName="image" smart="true"/>
</View>"""
SCENES: dict[str, Any] = {"count": 20, "seed": 5, "size": (160, 128)}  # make_scenes' arguments (--tasks: count)


def xdlabel(env: dict[str, str], *args: str) -> tuple[float, float, dict[str, Any]]:
    """Runs the command: its wall seconds, CPU seconds (user + system; on a shared machine the wall
    time depends on the others' load) and JSON answer."""
    start = time.perf_counter()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"xdlabel {' '.join(args)} failed: {done.stderr}")
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
    return time.perf_counter() - start, cpu, json.loads(done.stdout)


def predictions_of(client: LabelStudioClient, project_id: int) -> dict[int, list[int]]:
    """Task id -> the ids of the predictions it holds."""
    return {t["id"]: [p["id"] for p in t.get("predictions", [])] for t in client.tasks(project_id)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=SCENES["count"])
    args = parser.parse_args()
    times: list[tuple[str, float, float | None]] = []  # step, wall seconds, CPU seconds (xdlabel's)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        server = LocalLabelStudio(ensure_virtualenv(REPO / ".venv-labelstudio"), Path(tmp) / "ls")
        server.start()
        times.append(("Label Studio started (fresh data folder)", time.perf_counter() - start, None))
        try:
            client = LabelStudioClient(server.url, server.token)
            start = time.perf_counter()
            folder = server.files_root / "shapes"
            folder.mkdir(parents=True)
            for k, scene in enumerate(make_scenes(**{**SCENES, "count": args.tasks})):
                Image.fromarray(scene.image).save(folder / f"scene{k:03d}.png")
            project = client.sdk.projects.create(title="shapes", label_config=CONFIG)
            assert project.id is not None
            storage = client.sdk.import_storage.local.create(project=project.id, path=str(folder),
                                                             use_blob_urls=True)
            assert storage.id is not None
            client.sdk.import_storage.local.sync(id=storage.id)
            held = predictions_of(client, project.id)
            if len(held) != args.tasks:
                raise SystemExit(f"the storage sync made {len(held)} tasks, not {args.tasks}")
            times.append((f"project + storage synced ({args.tasks} tasks)", time.perf_counter() - start, None))
            env = {**os.environ, "XDLABEL_DATA_DIR": str(Path(tmp) / "xdlabel"), "XDLABEL_LS_URL": server.url,
                   "XDLABEL_LS_TOKEN": server.token, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            seconds, used, report = xdlabel(env, "prelabel", "--project", str(project.id))
            times.append((f"xdlabel prelabel ({report['predicted']} tasks, model load included)", seconds, used))
            seconds, used, again = xdlabel(env, "prelabel", "--project", str(project.id))
            times.append((f"xdlabel prelabel again ({again['skipped']} skipped)", seconds, used))
            first = predictions_of(client, project.id)
            redo = min(first)
            seconds, used, forced = xdlabel(env, "prelabel", "--project", str(project.id), "--force", "--task-id",
                                      str(redo))
            after = predictions_of(client, project.id)
            if len(after[redo]) != 1 or after[redo] == first[redo] or forced["predicted"] != 1:
                raise SystemExit(f"--force did not replace task {redo}'s prediction: {first[redo]} -> {after[redo]}")
            times.append(("xdlabel prelabel --force --task-id (1 task)", seconds, used))
            start = time.perf_counter()
            client.sdk.actions.create(id="predictions_to_annotations", project=project.id,
                                      selected_items={"all": True, "excluded": []})  # type: ignore[arg-type]
            times.append(("predictions accepted as annotations", time.perf_counter() - start, None))
            out = Path(tmp) / "labels.json"
            seconds, used, exported = xdlabel(env, "export", "--project", str(project.id), "--format", "coco",
                                        "--out", str(out))
            times.append(("xdlabel export --format coco", seconds, used))
            coco = json.loads(out.read_text())
        finally:
            server.stop()
    width = max(len(name) for name, _, _ in times)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after\n")
    print(f"{'step':<{width}}  wall s  CPU s")
    for name, seconds, cpu in times:
        print(f"{name:<{width}}  {seconds:6.1f}  " + ("" if cpu is None else f"{cpu:5.1f}"))
    print("\nper control and label (regions / under threshold / never found or not routed here):")
    for row in report["labels"]:
        note = "  not routed here" if not row.get("routed", True) else "  never found" if not row["found"] else ""
        print(f"  {row['control']}:{row['label']:<10} {row['regions']:>4} {row['under_threshold']:>4}{note}")
    print(f"\nCOCO: {len(coco['images'])} images, {len(coco['annotations'])} objects, "
          f"categories {[(c['name'], c['isthing']) for c in coco['categories']]}, {len(coco['captions'])} captions")
    print(f"exported: {exported['written']} objects from {exported['tasks']} tasks")


if __name__ == "__main__":
    main()

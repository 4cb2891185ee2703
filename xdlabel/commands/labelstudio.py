"""`xdlabel prelabel`, `export` and `labelstudio`: pushing pre-labels, the outbox, exports, the ML backend."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xdlabel.commands.common import emit, settings_of
from xdlabel.settings import labelstudio_client
from xdlabel.video_prelabel import prelabel_video_command, video_sampling_args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    prelabel = sub.add_parser("prelabel", help="pre-label a Label Studio project's tasks and push them in bulk")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--task", choices=["auto", "panoptic", "instance", "semantic", "ground"],
                          help="default: XDLABEL_LS_TASK (auto: panoptic with brushes, else instance; "
                               "video projects: instance or ground)")
    prelabel.add_argument("--threshold", type=float,
                          help="minimum region score for every label of every control: wins over the config's "
                               "model_score_threshold and XDLABEL_LS_THRESHOLDS (without it: those, then "
                               "XDLABEL_LS_SCORE_THRESHOLD)")
    prelabel.add_argument("--batch-size", type=int, default=4)
    prelabel.add_argument("--no-captions", action="store_true")
    prelabel.add_argument("--wait", type=float, default=60.0,
                          help="seconds to keep retrying an unreachable Label Studio at the end (exit 3 if still down)")
    prelabel.add_argument("--force", action="store_true",
                          help="predict again tasks that already hold (or have queued) a prediction of this model "
                               "version; it replaces the old one")
    prelabel.add_argument("--task-id", type=int, action="append", metavar="ID",
                          help="only this Label Studio task (repeatable; with --force: redo just these)")
    prelabel.add_argument("--preview", metavar="DIR",
                          help="also write each task's pre-labels drawn on its image: DIR/task-<id>.png")
    prelabel.add_argument("--json", action="store_true")
    video_sampling_args(prelabel)
    prelabel.set_defaults(func=prelabel_command)

    export = sub.add_parser("export", help="a Label Studio project's labels as COCO (RLE masks), PNG masks or JSON")
    export.add_argument("--project", type=int, required=True)
    export.add_argument("--format", choices=["coco", "png", "json"], default="coco")
    export.add_argument("--out", required=True, help="a file (coco, json) or a folder (png)")
    export.add_argument("--predictions", action="store_true", help="export predictions instead of annotations")
    export.add_argument("--from-store", action="store_true",
                        help="annotations xdlabel received by webhook (with --config, or the project's config "
                             "read from Label Studio when XDLABEL_LS_URL is set)")
    export.add_argument("--config", metavar="XML", help="the project's labeling config file (with --from-store)")
    export.add_argument("--all-tasks", action="store_true", help="list tasks without labels too (COCO)")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=export_command)

    ls = sub.add_parser("labelstudio", help="Label Studio connection").add_subparsers(dest="ls_command", required=True)
    connect = ls.add_parser("connect", help="register xdlabel's ML backend (/ml) in a project, with basic auth")
    connect.add_argument("--project", type=int, required=True)
    connect.add_argument("--url", required=True, help="the ML backend as Label Studio reaches it: http://host:8000/ml")
    connect.add_argument("--json", action="store_true")
    connect.set_defaults(func=ls_connect)
    deliver = ls.add_parser("deliver", help="push queued predictions (the outbox) to Label Studio")
    deliver.add_argument("--wait", type=float, default=0.0, help="seconds to keep retrying while it is down")
    deliver.add_argument("--json", action="store_true")
    deliver.set_defaults(func=ls_deliver)
    requeue = ls.add_parser("requeue", help="put failed predictions back in the outbox (then run deliver)")
    requeue.add_argument("--project", type=int, help="only this Label Studio project's")
    requeue.add_argument("--task", type=int, nargs="+", metavar="T", help="only these tasks'")
    requeue.add_argument("--json", action="store_true")
    requeue.set_defaults(func=ls_requeue)


def prelabel_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from annotator.prelabel import PrelabelSettings
    from annotator.project import (
        PrelabelOptions,
        PrelabelReport,
        describe,
        label_summary,
        prelabel_project,
        project_config,
    )
    from index.db import upgrade
    from xdlabel.services import Services

    settings = settings_of(args)
    client = labelstudio_client(settings)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    options = PrelabelOptions(
        batch_size=args.batch_size, task=args.task or settings.ls_task,
        default_threshold=settings.ls_score_threshold, threshold=args.threshold,
        thresholds=settings.ls_thresholds, label_map=settings.ls_label_map, routing=settings.ls_routing,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels, deliver_wait=args.wait,
        prelabel=PrelabelSettings(polygon_tolerance=settings.ls_polygon_tolerance, captions=not args.no_captions),
        force=args.force, task_ids=frozenset(args.task_id or ()))
    # A wrong URL, token or project is told now, before anything reads the checkpoint or loads the model.
    if (code := prelabel_video_command(args, settings, client, options)) is not None:
        return code  # a <Video> project: tracks (xdlabel/video_prelabel.py)
    project_config(client, args.project, options)
    bar = tqdm(unit="task", disable=args.json)

    def progress(report: PrelabelReport) -> None:
        bar.total = report.tasks - report.skipped
        bar.n = report.predicted + len(report.failed)
        bar.refresh()

    preview = None
    if args.preview:
        from pathlib import Path

        from PIL import Image

        from xdlabel.overlay import prediction_overlay

        folder = Path(args.preview)
        folder.mkdir(parents=True, exist_ok=True)

        def preview(task_id: int, image: Any, prediction: dict[str, Any]) -> None:
            prediction_overlay(Image.fromarray(image), prediction["result"],
                               f"task {task_id}: pre-labels").save(folder / f"task-{task_id}.png")

    # The model loads only once there is work to do.
    report = prelabel_project(lambda: services.predictor, client, services.sessions, args.project,
                              services.model_version_name, options, progress, preview)
    bar.close()
    services.close()
    summary = describe(report)
    if args.json:
        emit(summary, True)
    else:  # the per-label table instead of its rows as one line
        emit({k: v for k, v in summary.items() if k not in ("labels", "warnings")}, False)
        print(label_summary(report))
    for task_id, reason in report.failed.items():
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    if report.delivery.error:
        print(f"error: {report.delivery.error}", file=sys.stderr)
    return 2 if report.delivery.auth_error else 0 if report.delivery.pending == 0 else 3


def ls_deliver(args: argparse.Namespace) -> int:
    from annotator.outbox import Outbox
    from index.db import make_engine, make_session_factory, upgrade

    settings = settings_of(args)
    client = labelstudio_client(settings)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    report = Outbox(make_session_factory(engine), client, settings.ls_chunk_size).deliver(wait=args.wait)
    engine.dispose()
    emit(vars(report), args.json)
    if report.error:  # why rows are still queued: a refused token, or Label Studio down
        print(f"error: {report.error}", file=sys.stderr)
    return 2 if report.auth_error else 0 if report.pending == 0 else 3


def ls_requeue(args: argparse.Namespace) -> int:
    from annotator.outbox import requeue
    from index.db import make_engine, make_session_factory, upgrade

    settings = settings_of(args)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine)() as session:
        server = settings.ls_url.rstrip("/") if settings.ls_url else None
        count = requeue(session, server, args.project, args.task or ())
        session.commit()
    engine.dispose()
    emit({"requeued": count}, args.json)
    return 0


def ls_connect(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if not settings.ml_backend_password:
        raise ValueError("set XDLABEL_ML_BACKEND_PASSWORD (the same as the server's) to connect the ML backend")
    backend = labelstudio_client(settings).register_ml_backend(args.project, args.url, settings.ml_backend_user,
                                                       settings.ml_backend_password)
    emit({"project": args.project, "ml_backend": backend, "url": args.url}, args.json)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from annotator.export import tasks_from_store, to_coco, to_pngs
    from annotator.labeling import parse_labeling_config
    from index.db import make_engine, make_session_factory

    settings = settings_of(args)
    source = "predictions" if args.predictions else "annotations"
    if args.from_store:
        engine = make_engine(settings.sqlalchemy_url)
        with make_session_factory(engine)() as session:
            tasks = tasks_from_store(session, args.project)
        engine.dispose()
        # the config gives the categories' order and stuff; without one, labels as they appear
        if args.config:
            config = parse_labeling_config(Path(args.config).read_text())
        elif settings.ls_url and settings.ls_token:
            config = parse_labeling_config(labelstudio_client(settings).project(args.project)["label_config"])
        else:
            config = None
            print("warning: no labeling config (--config or XDLABEL_LS_URL): categories in order of appearance, "
                  "all things", file=sys.stderr)
    else:
        client = labelstudio_client(settings)
        config = parse_labeling_config(client.project(args.project)["label_config"])
        tasks = list(client.tasks(args.project))
    out = Path(args.out)
    if args.format == "png":
        written = len(to_pngs(tasks, out, config, source))
    elif args.format == "coco":
        out.parent.mkdir(parents=True, exist_ok=True)
        coco = to_coco(tasks, config, source, all_tasks=args.all_tasks)
        out.write_text(json.dumps(coco))
        written = len(coco["annotations"])
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks))
        written = len(tasks)
    emit({"format": args.format, "source": source, "tasks": len(tasks), "written": written, "out": str(out)},
          args.json)
    return 0

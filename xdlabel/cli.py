"""The ``xdlabel`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xdlabel.commands import labelstudio, training
from xdlabel.commands.common import migrated, settings_of


def _db_upgrade(args: argparse.Namespace) -> int:
    from index.db import upgrade

    settings = settings_of(args)
    upgrade(settings.sqlalchemy_url, args.revision)
    print(f"database at revision {args.revision}: {settings.sqlalchemy_url}")
    return 0


def _index_rebuild(args: argparse.Namespace) -> int:
    from xdlabel.services import Services

    services = Services(migrated(args))
    model = services.model
    reports = {kind: services.store.rebuild(model.version_id, kind, dim)
               for kind, dim in (("image", model.image_dim), ("region", model.region_dim))}
    services.close()
    if args.json:
        print(json.dumps({k: {"action": r.action, "count": r.count} for k, r in reports.items()}))
    else:
        for kind, report in reports.items():
            print(f"{kind} index of {model.name}: {report.action} from SQL, {report.count} vectors")
    return 0


def _apikey_create(args: argparse.Namespace) -> int:
    from index.db import make_engine, make_session_factory
    from xdlabel.api.auth import create_api_key

    engine = make_engine(migrated(args).sqlalchemy_url)
    with make_session_factory(engine)() as session:
        key = create_api_key(session, args.name, [s.strip() for s in args.scopes.split(",")])
    engine.dispose()
    print(key)
    return 0


def _apikey_list(args: argparse.Namespace) -> int:
    from index.db import make_engine, make_session_factory
    from xdlabel.api.auth import list_api_keys

    engine = make_engine(migrated(args).sqlalchemy_url)
    with make_session_factory(engine)() as session:
        keys: list[dict[str, Any]] = [
            {"id": k.id, "name": k.name, "scopes": list(k.scopes), "created_at": k.created_at.isoformat(),
             "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None} for k in list_api_keys(session)]
    engine.dispose()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    for k in keys:
        state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
        print(f"{k['id']:>5}  {k['name']}  {','.join(k['scopes'])}  created {k['created_at']}  {state}")
    return 0


def _apikey_revoke(args: argparse.Namespace) -> int:
    from index.db import make_engine, make_session_factory
    from xdlabel.api.auth import revoke_api_key

    engine = make_engine(migrated(args).sqlalchemy_url)
    with make_session_factory(engine)() as session:
        row = revoke_api_key(session, args.id)
    engine.dispose()
    if row is None:
        raise ValueError(f"no API key with id {args.id}; see xdlabel apikey list")
    print(f"API key {row.id} ({row.name}) revoked")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from index.db import upgrade
    from xdlabel.api.app import CONFIG_FILE_VARIABLE, create_app
    from xdlabel.api.spread import CONNECTION_BOARD_VARIABLE, ConnectionBoard

    settings = settings_of(args)
    if args.workers > 1 and settings.ml_backend_password:
        print("error: --workers > 1 with the ML backend on (XDLABEL_ML_BACKEND_PASSWORD): its per-project state "
              "lives in one process; serve Label Studio from a --workers 1 server", file=sys.stderr)
        return 2
    upgrade(settings.sqlalchemy_url)
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
        return 0
    # each worker process reads the settings again, from the same sources as this one
    if args.config_file:
        os.environ[CONFIG_FILE_VARIABLE] = str(Path(args.config_file).resolve())
    else:
        os.environ.pop(CONFIG_FILE_VARIABLE, None)
    # the workers' model threads share the cores instead of each taking all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    # keep-alive connections that a burst sent to one worker are spread over all (xdlabel.api.spread)
    board = ConnectionBoard.create()
    os.environ[CONNECTION_BOARD_VARIABLE] = str(board)
    try:
        uvicorn.run("xdlabel.api.app:app_from_environment", factory=True, workers=args.workers, host=args.host,
                    port=args.port, log_level="info", http="xdlabel.api.spread:CountingProtocol")
    finally:
        board.unlink(missing_ok=True)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _search(args: argparse.Namespace) -> int:
    from index.filters import Filters
    from xdlabel.search import search_text
    from xdlabel.services import Services

    services = Services(migrated(args))
    if args.group == "video":
        return _search_moments(args, services)
    filters = Filters(tags=tuple(args.tag))
    result = search_text(services, args.query, k=args.k, negative=args.negative, filters=filters,
                         regions=args.regions, recall=args.recall, nprobe=args.nprobe)
    services.close()
    if args.json:
        print(json.dumps(result.hits, indent=2, default=str))
    else:
        for hit in result.hits:
            print(f"{hit['score']:.4f}  image {hit['image_id']}  {hit['uri']}  {hit['caption'] or ''}")
    return 0


def _search_moments(args: argparse.Namespace, services: Any) -> int:
    from xdlabel.moments import VideoFilters, search_moments

    filters = VideoFilters(min_duration=args.min_duration, max_duration=args.max_duration)
    moments = search_moments(services, args.query, k=args.k, negative=args.negative, filters=filters)
    services.close()
    if args.json:
        print(json.dumps(moments, indent=2, default=str))
    else:
        for m in moments:
            print(f"{m['score']:.4f}  video {m['video_id']}  {m['uri']}  {m['start']:.2f}-{m['end']:.2f} s  "
                  f"(best frame: image {m['best_image_id']} at {m['best_time']:.2f} s)")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from xdlabel.outputs import parse_outputs

    settings = settings_of(args)
    outputs = parse_outputs(settings.ingest_outputs if args.outputs is None else args.outputs)  # before torch loads

    from tqdm import tqdm

    from index.db import upgrade
    from xdlabel.ingest import IngestPipeline, IngestReport, LabelStudioPush
    from xdlabel.services import Services
    from xdlabel.sources import items_from
    from xdlabel.video import Sampling
    from xdlabel.video_ingest import VideoPipeline, merge_reports, split_videos

    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    push = LabelStudioPush.from_settings(settings, services.model_version_name)
    data_dir = [settings.data_dir]  # the database and indexes are never a source, whoever asks
    items = items_from(args.paths, glob=args.glob, image_root=Path(args.image_root) if args.image_root else None,
                       labelstudio=push.client if push else None, forbidden=data_dir)
    if args.engine == "ray" and any("ls_task" in item.meta for item in items):
        raise ValueError("Label Studio sources run on the local engine (--engine local)")
    stills, videos = split_videos(items)
    fps = args.fps if args.fps is not None or args.every_n is not None else 1.0
    sampling = Sampling(fps=fps, every_n=args.every_n, scene=args.scene)  # checked before anything runs
    if args.engine == "ray" and videos:
        raise ValueError("videos run on the local engine (--engine local)")
    bar = tqdm(total=len(items), unit="img", disable=args.json or not sys.stderr.isatty() and not args.progress)

    def progress(report: IngestReport) -> None:
        bar.n = len(report.added) + len(report.failed) + len(report.duplicates)
        bar.set_postfix(added=len(report.added), failed=len(report.failed), refresh=False)
        bar.refresh()

    if args.engine == "ray":
        from xdlabel.ray_engine import run_on_ray

        report = run_on_ray(services, args.dataset, items, batch_size=args.batch_size, tags=tuple(args.tag),
                            actors=args.actors, address=args.ray_address, progress=progress, forbidden=data_dir,
                            outputs=outputs)
    else:
        report = IngestPipeline(services, args.dataset, batch_size=args.batch_size, tags=args.tag,
                                progress=progress, push=push, forbidden=data_dir, outputs=outputs).run(stills)
        if videos:  # each video's sampled frames: image rows linked to the video
            report = merge_reports(report, VideoPipeline(
                services, args.dataset, sampling=sampling, batch_size=args.batch_size, tags=args.tag,
                progress=progress, forbidden=data_dir, outputs=outputs).run(videos))
    bar.close()
    services.close()
    summary: dict[str, object] = {"added": len(report.added), "duplicates": len(report.duplicates),
                                  "failed": report.failed}
    if report.delivery is not None:
        summary["labelstudio"] = {"delivered": report.delivery.delivered, "pending": report.delivery.pending,
                                  "failed": report.delivery.failed, "error": report.delivery.error}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{len(report.added)} images added, {len(report.duplicates)} duplicates skipped, "
              f"{len(report.failed)} failed")
        if report.delivery is not None:
            print(f"Label Studio: {report.delivery.delivered} pre-labels delivered, {report.delivery.pending} "
                  f"queued{f' ({report.delivery.error})' if report.delivery.error else ''}")
        for uri, reason in report.failed.items():
            print(f"  failed: {uri}: {reason}")
    # Failing means nothing could be used: images another ingest stored meanwhile are not failures.
    return 1 if report.failed and not report.added and not report.duplicates else 0


def _worker(args: argparse.Namespace) -> int:
    import logging
    import threading

    from index.db import upgrade
    from xdlabel.jobs import stop_on_signals, work
    from xdlabel.services import Services

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = settings_of(args)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    stop = threading.Event()
    with stop_on_signals(stop):  # SIGTERM/SIGINT: finish the batch, release the job, exit 0
        ran = work(services, once=args.once, poll=args.poll, stop=stop, preload=not args.once)
    services.close()
    print(f"ran {ran} jobs")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xdlabel.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdlabel", description=__doc__)
    parser.add_argument("--config-file", help="settings file of XDLABEL_* lines (environment variables win)")
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)

    index = sub.add_parser("index", help="vector index maintenance").add_subparsers(dest="index_command",
                                                                                    required=True)
    rebuild = index.add_parser("rebuild", help="rebuild the FAISS indexes of the current model from SQL")
    rebuild.add_argument("--json", action="store_true")
    rebuild.set_defaults(func=_index_rebuild)

    apikey = sub.add_parser("apikey", help="API keys").add_subparsers(dest="apikey_command", required=True)
    create = apikey.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("name")
    create.add_argument("--scopes", default="read,write", help="comma-separated: read, write")
    create.set_defaults(func=_apikey_create)
    listing = apikey.add_parser("list", help="list keys: id, name, scopes, created, revoked (never the key)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_apikey_list)
    revoke = apikey.add_parser("revoke", help="revoke a key at once (kept in the list as revoked)")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=_apikey_revoke)

    ingest = sub.add_parser("ingest", help="add images to a dataset (one model pass each); resumable")
    ingest.add_argument("paths", nargs="+", help="folders, image files, .txt/.csv lists, COCO .json, http(s) URLs, "
                                                 "labelstudio://PROJECT (its pre-labels are pushed back)")
    ingest.add_argument("--glob", default="**/*", help="pattern inside folders (default: recursive)")
    ingest.add_argument("--image-root", help="folder of a COCO file's images (default: beside it)")
    ingest.add_argument("--progress", action="store_true", help="show the progress bar even without a terminal")
    ingest.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local threads, or Ray Data with an actor pool holding the model")
    ingest.add_argument("--actors", type=int, default=1, help="Ray: model actors (one GPU each when present)")
    ingest.add_argument("--ray-address", help="Ray: cluster address (auto, ray://head:10001); default: local")
    ingest.add_argument("--dataset", required=True)
    ingest.add_argument("--tag", action="append", default=[], help="tag every image (repeatable)")
    ingest.add_argument("--batch-size", type=int, default=4)
    ingest.add_argument("--outputs", help="what to store per image, of embedding,regions,caption (default: all, or "
                        "XDLABEL_INGEST_OUTPUTS); the work for the rest is skipped")
    ingest.add_argument("--fps", type=float, help="videos: frames kept per second (default 1)")
    ingest.add_argument("--every-n", type=int, help="videos: keep every n-th decoded frame instead")
    ingest.add_argument("--scene", type=float, help="videos: keep a frame only when it differs from the last kept "
                                                    "one by more than this (0..1, mean thumbnail difference)")
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(func=_ingest)

    worker = sub.add_parser("worker", help="run queued jobs (several workers may share a PostgreSQL database)")
    worker.add_argument("--once", action="store_true", help="exit when no job is left")
    worker.add_argument("--poll", type=float, default=2.0,
                        help="seconds between looks for new jobs (a dead worker's job is taken over within "
                             "XDLABEL_JOB_LEASE_SECONDS + this)")
    worker.set_defaults(func=_worker)

    serve = sub.add_parser("serve", help="run the HTTP API and search page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=_positive, default=1,
                       help="server processes sharing the port (search scales past one core's GIL; the ML "
                            "backend needs 1)")
    serve.set_defaults(func=_serve)

    search = sub.add_parser("search", help="text search from the command line")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--negative", help="what the hits should not show")
    search.add_argument("--tag", action="append", default=[], help="only images with this tag (repeatable)")
    search.add_argument("--regions", action="store_true", help="search regions instead of whole images")
    search.add_argument("--group", choices=["image", "video"], default="image",
                        help="video: moments (time ranges of one video) instead of images")
    search.add_argument("--min-duration", type=float, help="--group video: only videos at least this long (s)")
    search.add_argument("--max-duration", type=float, help="--group video: only videos at most this long (s)")
    search.add_argument("--recall", type=_fraction,
                        help="recall@10 target in (0, 1] (default XDLABEL_SEARCH_RECALL, 0.95)")
    search.add_argument("--nprobe", type=int, help="expert override of --recall: IVF lists to probe (graph: its beam)")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=_search)

    training.register(sub)
    labelstudio.register(sub)

    demo = sub.add_parser("demo", help="run the main job on embedded defaults")
    demo.add_argument("--out", help="output folder (default: <XDLABEL_DATA_DIR>/demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line saying what and what to do; --debug for the rest
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_explain(err)}", file=sys.stderr)
        return 2


def _explain(err: BaseException) -> str:
    """An exception as one line for the person at the terminal: what went wrong and what to do."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(err, DBAPIError):
        message = str(err.orig).strip().splitlines()[0] if str(err.orig).strip() else type(err.orig).__name__
        if "disk is full" in message.lower() or "no space" in message.lower():
            return f"the database is out of disk space ({message}); free space and retry"
        if "locked" in message.lower():
            return f"the database is busy ({message}); retry when the other writer is done"
        return f"database error: {message}; check XDLABEL_DATABASE_URL, then run xdlabel db upgrade"
    from pydantic import ValidationError

    if isinstance(err, ValidationError) and err.errors():  # its first line names only the model
        detail = err.errors()[0]
        where = ".".join(str(part) for part in detail["loc"])
        where = f"XDLABEL_{where.upper()}" if err.title == "Settings" else where
        return f"{where}: {detail['msg']}"
    if isinstance(err, (ValueError, OSError, LookupError)):
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return text or type(err).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first} (run with --debug for the traceback)" if first else \
        f"{type(err).__name__} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())

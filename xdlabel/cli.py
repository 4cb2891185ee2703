"""The ``xdlabel`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _model_info(args: argparse.Namespace) -> int:
    from xdecoder import build_model, load_checkpoint
    from xdecoder.config import get_config

    cfg = get_config(args.config)
    info: dict[str, object] = {"config": cfg.name, "backbone": type(cfg.backbone).__name__,
                               "num_queries": cfg.decoder.num_queries, "dim_proj": cfg.dim_proj}
    if args.checkpoint:
        model = build_model(cfg)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        loaded = load_checkpoint(model, args.checkpoint)  # a bad file: main() reports it, exit 2
        info.update(checkpoint=str(loaded.path), sha256=loaded.sha256, tensors=loaded.num_tensors,
                    ignored_keys=list(loaded.ignored))
    _emit(info, args.json)
    return 0


def _model_bundle(args: argparse.Namespace) -> int:
    """Evaluate a training run on held-out scenes and install it as the bundled model."""
    import hashlib
    import shutil
    from pathlib import Path

    import xdecoder.training.synthetic as synthetic
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.checkpoint import file_sha256
    from xdecoder.predictor import PredictorSettings
    from xdecoder.training.evaluate import evaluate
    from xdlabel.settings import BUNDLED_CHECKPOINT

    run = Path(args.run)
    meta = json.loads((run / "meta.json").read_text())
    if meta["step"] < meta["train"]["steps"]:
        raise ValueError(f"{run} stopped at step {meta['step']} of {meta['train']['steps']}: finish the run first")
    model = build_model(meta["config"])
    load_checkpoint(model, run / "model.safetensors")
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=args.height,
                                                                          caption_steps=args.caption_steps))
    size = (args.width, args.height)
    metrics = evaluate(predictor, synthetic.make_scenes(args.scenes, seed=args.seed, size=size))
    BUNDLED_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "model.safetensors", BUNDLED_CHECKPOINT)
    info = {
        "config": meta["config"], "classes": meta["classes"], "stuff": list(synthetic.STUFF),
        "short_side": args.height, "caption_steps": args.caption_steps, "train_size": list(size),
        "training": meta["train"],
        "training_data": {"generator": "xdecoder.training.synthetic", "seed": meta["train"]["seed"],
                          "generator_sha256": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()},
        "heldout": {"seed": args.seed, "scenes": args.scenes, "metrics": metrics},
        "sha256": file_sha256(BUNDLED_CHECKPOINT),
    }
    BUNDLED_CHECKPOINT.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    _emit({"bundled": str(BUNDLED_CHECKPOINT), **{k: v for k, v in metrics.items() if "/" not in k}}, args.json)
    return 0


def _emit(values: dict[str, object], as_json: bool) -> None:
    """A result as JSON for scripts, or aligned key: value lines for people."""
    if as_json:
        print(json.dumps(values, indent=2, default=str))
    else:
        for key, value in values.items():
            print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from xdlabel.settings import load_settings

    return load_settings(args.config_file)


def _db_upgrade(args: argparse.Namespace) -> int:
    from index.db import upgrade

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url, args.revision)
    print(f"database at revision {args.revision}: {settings.sqlalchemy_url}")
    return 0


def _index_rebuild(args: argparse.Namespace) -> int:
    from xdlabel.services import Services

    services = Services(_migrated(args))
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


def _migrated(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings, with the database brought to the current schema (a fresh data folder works)."""
    from index.db import upgrade

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    return settings


def _apikey_create(args: argparse.Namespace) -> int:
    from index.db import make_engine, make_session_factory
    from xdlabel.api.auth import create_api_key

    engine = make_engine(_migrated(args).sqlalchemy_url)
    with make_session_factory(engine)() as session:
        key = create_api_key(session, args.name, [s.strip() for s in args.scopes.split(",")])
    engine.dispose()
    print(key)
    return 0


def _apikey_list(args: argparse.Namespace) -> int:
    from index.db import make_engine, make_session_factory
    from xdlabel.api.auth import list_api_keys

    engine = make_engine(_migrated(args).sqlalchemy_url)
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

    engine = make_engine(_migrated(args).sqlalchemy_url)
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
    from xdlabel.api import create_app

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def _search(args: argparse.Namespace) -> int:
    from index.filters import Filters
    from xdlabel.search import search_text
    from xdlabel.services import Services

    services = Services(_migrated(args))
    filters = Filters(tags=tuple(args.tag))
    result = search_text(services, args.query, k=args.k, negative=args.negative, filters=filters,
                         regions=args.regions)
    services.close()
    if args.json:
        print(json.dumps(result.hits, indent=2, default=str))
    else:
        for hit in result.hits:
            print(f"{hit['score']:.4f}  image {hit['image_id']}  {hit['uri']}  {hit['caption'] or ''}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from index.db import upgrade
    from xdlabel.ingest import IngestPipeline, IngestReport, LabelStudioPush
    from xdlabel.services import Services
    from xdlabel.sources import items_from

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    push = LabelStudioPush.from_settings(settings, services.model_version_name)
    data_dir = [settings.data_dir]  # the database and indexes are never a source, whoever asks
    items = items_from(args.paths, glob=args.glob, image_root=Path(args.image_root) if args.image_root else None,
                       labelstudio=push.client if push else None, forbidden=data_dir)
    if args.engine == "ray" and any("ls_task" in item.meta for item in items):
        raise ValueError("Label Studio sources run on the local engine (--engine local)")
    bar = tqdm(total=len(items), unit="img", disable=args.json or not sys.stderr.isatty() and not args.progress)

    def progress(report: IngestReport) -> None:
        bar.n = len(report.added) + len(report.failed) + len(report.duplicates)
        bar.set_postfix(added=len(report.added), failed=len(report.failed), refresh=False)
        bar.refresh()

    if args.engine == "ray":
        from xdlabel.ray_engine import run_on_ray

        report = run_on_ray(services, args.dataset, items, batch_size=args.batch_size, tags=tuple(args.tag),
                            actors=args.actors, address=args.ray_address, progress=progress, forbidden=data_dir)
    else:
        report = IngestPipeline(services, args.dataset, batch_size=args.batch_size, tags=args.tag,
                                progress=progress, push=push, forbidden=data_dir).run(items)
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
    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    stop = threading.Event()
    with stop_on_signals(stop):  # SIGTERM/SIGINT: finish the batch, release the job, exit 0
        ran = work(services, once=args.once, poll=args.poll, stop=stop, preload=not args.once)
    services.close()
    print(f"ran {ran} jobs")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """Fine-tune on labelled data (a Label Studio project or a COCO file) with held-out metrics."""
    from pathlib import Path

    from tqdm import tqdm

    from annotator.dataset import scenes_from_coco
    from index.db import make_engine, make_session_factory, upgrade
    from xdlabel.finetune import FinetuneOptions, coco_image_reader, describe, finetune, labelstudio_data

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    sessions = make_session_factory(engine)
    size = (args.width, args.height)
    if args.coco:
        root = Path(args.image_root) if args.image_root else Path(args.coco).parent
        client = _ls_client(settings) if settings.ls_url and settings.ls_token else None
        reader = coco_image_reader(root, client, settings.max_image_bytes)
        data = scenes_from_coco(Path(args.coco), size, Path(args.image_root) if args.image_root else None,
                                Path(args.captions) if args.captions else None, read_image=reader)
    else:
        data = labelstudio_data(_ls_client(settings), args.from_labelstudio, size,
                                sessions if args.from_store else None, settings.max_image_bytes)
    options = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              freeze_backbone=args.freeze_backbone, freeze_text=args.freeze_text)
    bar = tqdm(total=args.steps, unit="step", disable=args.json)
    report = finetune(args.config or settings.model, args.init or settings.checkpoint, data.scenes,
                      data.class_names, data.stuff, Path(args.out), options, data_digest=data.digest,
                      sessions=sessions, log=lambda step, record: bar.update(1))
    bar.close()
    engine.dispose()
    _emit({**describe(report), "skipped": data.skipped}, args.json)
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    if args.from_labelstudio is not None or args.coco:
        return _finetune(args)
    args.config = args.config or "parity"
    import torch

    torch.manual_seed(args.seed)  # the initial weights too: same seed, same run

    from xdecoder import build_model, load_checkpoint
    from xdecoder.training.trainer import TrainConfig, Trainer, synthetic_batches

    model = build_model(args.config)
    if args.init:
        load_checkpoint(model, args.init)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      freeze_backbone=args.freeze_backbone, freeze_text=args.freeze_text,
                      checkpoint_every=args.checkpoint_every)
    trainer = Trainer(model, cfg)
    out = Path(args.out)
    resumed = trainer.resume(out)
    bar = tqdm(total=cfg.steps, initial=trainer.step, unit="step", disable=args.json)

    def log(step: int, record: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    import hashlib

    import xdecoder.training.synthetic as synthetic

    data = {"generator": "xdecoder.training.synthetic", "seed": args.seed, "size": [args.width, args.height],
            "generator_sha256": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()}
    history = trainer.fit(synthetic_batches(cfg, (args.width, args.height)), folder=out, log=log,
                          meta={"training_data": data})
    bar.close()
    summary = {"checkpoint": str(out), "resumed_from_step": resumed and (cfg.steps - len(history)),
               "steps": trainer.step, "final_loss": history[-1]["loss"] if history else None}
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.predictor import PredictorSettings
    from xdecoder.training.evaluate import evaluate
    from xdecoder.training.synthetic import make_scenes

    model = build_model(args.config)
    load_checkpoint(model, args.checkpoint)
    predictor = Predictor(model, settings=PredictorSettings(short_side=args.height, caption_steps=args.caption_steps))
    metrics = evaluate(predictor, make_scenes(args.scenes, seed=args.seed, size=(args.width, args.height)))
    _emit(dict(metrics), args.json)
    return 0


def _ls_client(settings):  # type: ignore[no-untyped-def]
    from xdlabel.settings import labelstudio_client

    return labelstudio_client(settings)


def _prelabel(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from annotator.prelabel import PrelabelSettings
    from annotator.project import PrelabelOptions, PrelabelReport, describe, prelabel_project
    from index.db import upgrade
    from xdlabel.services import Services

    settings = _settings(args)
    client = _ls_client(settings)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    options = PrelabelOptions(
        batch_size=args.batch_size, task=args.task or settings.ls_task,
        default_threshold=settings.ls_score_threshold if args.threshold is None else args.threshold,
        thresholds=settings.ls_thresholds, max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels, deliver_wait=args.wait,
        prelabel=PrelabelSettings(polygon_tolerance=settings.ls_polygon_tolerance, captions=not args.no_captions),
        force=args.force, task_ids=frozenset(args.task_id or ()))
    bar = tqdm(unit="task", disable=args.json)

    def progress(report: PrelabelReport) -> None:
        bar.total = report.tasks - report.skipped
        bar.n = report.predicted + len(report.failed)
        bar.refresh()

    report = prelabel_project(services.predictor, client, services.sessions, args.project,
                              services.model_version_name, options, progress)
    bar.close()
    services.close()
    _emit(describe(report), args.json)
    for task_id, reason in report.failed.items():
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    if report.delivery.error:
        print(f"error: {report.delivery.error}", file=sys.stderr)
    return 2 if report.delivery.auth_error else 0 if report.delivery.pending == 0 else 3


def _ls_deliver(args: argparse.Namespace) -> int:
    from annotator.outbox import Outbox
    from index.db import make_engine, make_session_factory, upgrade

    settings = _settings(args)
    client = _ls_client(settings)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    report = Outbox(make_session_factory(engine), client, settings.ls_chunk_size).deliver(wait=args.wait)
    engine.dispose()
    _emit(vars(report), args.json)
    if report.error:  # why rows are still queued: a refused token, or Label Studio down
        print(f"error: {report.error}", file=sys.stderr)
    return 2 if report.auth_error else 0 if report.pending == 0 else 3


def _ls_requeue(args: argparse.Namespace) -> int:
    from annotator.outbox import requeue
    from index.db import make_engine, make_session_factory, upgrade

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    with make_session_factory(engine)() as session:
        server = settings.ls_url.rstrip("/") if settings.ls_url else None
        count = requeue(session, server, args.project, args.task or ())
        session.commit()
    engine.dispose()
    _emit({"requeued": count}, args.json)
    return 0


def _ls_connect(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.ml_backend_password:
        raise ValueError("set XDLABEL_ML_BACKEND_PASSWORD (the same as the server's) to connect the ML backend")
    backend = _ls_client(settings).register_ml_backend(args.project, args.url, settings.ml_backend_user,
                                                       settings.ml_backend_password)
    _emit({"project": args.project, "ml_backend": backend, "url": args.url}, args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from annotator.export import tasks_from_store, to_coco, to_pngs
    from annotator.labeling import parse_labeling_config
    from index.db import make_engine, make_session_factory

    settings = _settings(args)
    source = "predictions" if args.predictions else "annotations"
    if args.from_store:
        engine = make_engine(settings.sqlalchemy_url)
        with make_session_factory(engine)() as session:
            tasks = tasks_from_store(session, args.project)
        engine.dispose()
        config = None
    else:
        client = _ls_client(settings)
        config = parse_labeling_config(client.project(args.project)["label_config"])
        tasks = list(client.tasks(args.project))
    out = Path(args.out)
    if args.format == "png":
        written = len(to_pngs(tasks, out, config, source))
    elif args.format == "coco":
        out.parent.mkdir(parents=True, exist_ok=True)
        coco = to_coco(tasks, config, source)
        out.write_text(json.dumps(coco))
        written = len(coco["annotations"])
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks))
        written = len(tasks)
    _emit({"format": args.format, "source": source, "tasks": len(tasks), "written": written, "out": str(out)},
          args.json)
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
    ingest.add_argument("--json", action="store_true")
    ingest.set_defaults(func=_ingest)

    worker = sub.add_parser("worker", help="run queued jobs (several workers may share a PostgreSQL database)")
    worker.add_argument("--once", action="store_true", help="exit when no job is left")
    worker.add_argument("--poll", type=float, default=2.0,
                        help="seconds between looks for new jobs (a dead worker's job is taken over within "
                             "XDLABEL_JOB_LEASE_SECONDS + this)")
    worker.set_defaults(func=_worker)

    train = sub.add_parser("train", help="train X-Decoder on synthetic scenes, or fine-tune it on a Label Studio "
                                         "project's annotations (resumable)")
    train.add_argument("--config", help="model config (default: parity; with --from-labelstudio: XDLABEL_MODEL)")
    train.add_argument("--init", help="checkpoint to start from (local or hf://; with --from-labelstudio: "
                                      "default XDLABEL_CHECKPOINT)")
    train.add_argument("--from-labelstudio", type=int, metavar="PROJECT",
                       help="fine-tune on this project's annotations; held-out metrics before/after; the result "
                            "is registered as a model version only if it is better")
    train.add_argument("--from-store", action="store_true",
                       help="with --from-labelstudio: the annotations xdlabel received by webhook")
    train.add_argument("--coco", help="fine-tune on a COCO instances file (polygons or RLE; as --from-labelstudio)")
    train.add_argument("--image-root", help="with --coco: the images' folder (default: beside the file)")
    train.add_argument("--captions", help="with --coco: a COCO captions file")
    train.add_argument("--out", required=True, help="checkpoint folder; an existing one is resumed")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--width", type=int, default=160)
    train.add_argument("--height", type=int, default=128)
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--freeze-backbone", action="store_true")
    train.add_argument("--freeze-text", action="store_true")
    train.add_argument("--json", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="held-out synthetic metrics: mIoU, PQ, referring IoU, R@1, BLEU-4")
    evaluate.add_argument("--config", default="parity")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--scenes", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=12345, help="held out: training uses other seeds")
    evaluate.add_argument("--width", type=int, default=160)
    evaluate.add_argument("--height", type=int, default=128)
    evaluate.add_argument("--caption-steps", type=int, help="longest caption in tokens (default: the config's)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_eval)

    serve = sub.add_parser("serve", help="run the HTTP API and search page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    search = sub.add_parser("search", help="text search from the command line")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--negative", help="what the hits should not show")
    search.add_argument("--tag", action="append", default=[], help="only images with this tag (repeatable)")
    search.add_argument("--regions", action="store_true", help="search regions instead of whole images")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=_search)

    model = sub.add_parser("model", help="inspect X-Decoder configs and checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="describe a config; with --checkpoint, load it strictly")
    info.add_argument("--config", default="focalt", help="focalt, focall, davitd3, davitd5, parity")
    info.add_argument("--checkpoint", help="local .pt/.safetensors path or hf://owner/repo/file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_model_info)

    prelabel = sub.add_parser("prelabel", help="pre-label a Label Studio project's tasks and push them in bulk")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--task", choices=["auto", "panoptic", "instance", "semantic"],
                          help="default: XDLABEL_LS_TASK (auto: panoptic with brushes, else instance)")
    prelabel.add_argument("--threshold", type=float, help="minimum region score (default: XDLABEL_LS_SCORE_THRESHOLD)")
    prelabel.add_argument("--batch-size", type=int, default=4)
    prelabel.add_argument("--no-captions", action="store_true")
    prelabel.add_argument("--wait", type=float, default=60.0,
                          help="seconds to keep retrying an unreachable Label Studio at the end (exit 3 if still down)")
    prelabel.add_argument("--force", action="store_true",
                          help="predict again tasks that already hold (or have queued) a prediction of this model "
                               "version; it replaces the old one")
    prelabel.add_argument("--task-id", type=int, action="append", metavar="ID",
                          help="only this Label Studio task (repeatable; with --force: redo just these)")
    prelabel.add_argument("--json", action="store_true")
    prelabel.set_defaults(func=_prelabel)

    export = sub.add_parser("export", help="a Label Studio project's labels as COCO (RLE masks), PNG masks or JSON")
    export.add_argument("--project", type=int, required=True)
    export.add_argument("--format", choices=["coco", "png", "json"], default="coco")
    export.add_argument("--out", required=True, help="a file (coco, json) or a folder (png)")
    export.add_argument("--predictions", action="store_true", help="export predictions instead of annotations")
    export.add_argument("--from-store", action="store_true",
                        help="annotations xdlabel received by webhook, without asking Label Studio")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_export)

    ls = sub.add_parser("labelstudio", help="Label Studio connection").add_subparsers(dest="ls_command", required=True)
    connect = ls.add_parser("connect", help="register xdlabel's ML backend (/ml) in a project, with basic auth")
    connect.add_argument("--project", type=int, required=True)
    connect.add_argument("--url", required=True, help="the ML backend as Label Studio reaches it: http://host:8000/ml")
    connect.add_argument("--json", action="store_true")
    connect.set_defaults(func=_ls_connect)
    deliver = ls.add_parser("deliver", help="push queued predictions (the outbox) to Label Studio")
    deliver.add_argument("--wait", type=float, default=0.0, help="seconds to keep retrying while it is down")
    deliver.add_argument("--json", action="store_true")
    deliver.set_defaults(func=_ls_deliver)
    requeue = ls.add_parser("requeue", help="put failed predictions back in the outbox (then run deliver)")
    requeue.add_argument("--project", type=int, help="only this Label Studio project's")
    requeue.add_argument("--task", type=int, nargs="+", metavar="T", help="only these tasks'")
    requeue.add_argument("--json", action="store_true")
    requeue.set_defaults(func=_ls_requeue)

    bundle = model_sub.add_parser("bundle", help="evaluate a finished training run on held-out synthetic scenes "
                                                 "and install it as the bundled model (make train-demo)")
    bundle.add_argument("run", help="the training run's folder (xdlabel train --out)")
    bundle.add_argument("--width", type=int, default=96)
    bundle.add_argument("--height", type=int, default=64)
    bundle.add_argument("--scenes", type=int, default=100)
    bundle.add_argument("--caption-steps", type=int, default=24, help="longest caption, in tokens")
    bundle.add_argument("--seed", type=int, default=12345, help="held out: training uses other seeds")
    bundle.add_argument("--json", action="store_true")
    bundle.set_defaults(func=_model_bundle)

    demo = sub.add_parser("demo", help="run the main job on embedded defaults")
    demo.add_argument("--out", default="xdlabel-data/demo", help="output folder")
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
    if isinstance(err, (ValueError, OSError, LookupError)):
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return text or type(err).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first} (run with --debug for the traceback)" if first else \
        f"{type(err).__name__} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())

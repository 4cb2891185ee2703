"""`xdlabel train`, `eval` and `model`: training, held-out metrics, checkpoints and the bundled model."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from xdlabel.commands.common import emit, settings_of
from xdlabel.settings import labelstudio_client

if TYPE_CHECKING:
    from xdecoder.preprocess import PredictorSettings

DECODER_WEIGHT_HELP = "text->image score's weight on the decoder embedding, the rest on the backbone's (official: 0.5)"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    train.add_argument("--min-width", type=int, default=0,
                       help="synthetic: draw each step's width from MIN to --width, so that training sees "
                            "images padded to a multiple of 32, as photos of other aspects are at inference")
    train.add_argument("--portrait", type=float, default=0.0,
                       help="synthetic: chance that a step's scenes are portrait (width and height swapped)")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--no-object-weight", type=float, default=0.1,
                       help="class-loss weight of 'no object' for unmatched queries (official: 0.1)")
    train.add_argument("--near-misses", type=int, default=0,
                       help="synthetic: negative captions per image, each wrong in one detail, for retrieval")
    train.add_argument("--retrieval-weight", type=float, default=2.0,
                       help="weight of the image-caption contrastive loss (official: 2)")
    train.add_argument("--name-separation", type=float, default=0.0,
                       help="weight of a loss keeping class-name embeddings apart (not official; for a text "
                            "encoder trained from nothing)")
    train.add_argument("--freeze-backbone", action="store_true")
    train.add_argument("--freeze-text", action="store_true")
    train.add_argument("--json", action="store_true", help="no progress bar")
    train.set_defaults(func=train_command)

    evaluate = sub.add_parser("eval", help="held-out synthetic metrics: mIoU, PQ, referring IoU, R@1, BLEU-4")
    evaluate.add_argument("--config", default="parity")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--scenes", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=12345, help="held out: training uses other seeds")
    evaluate.add_argument("--width", type=int, default=160)
    evaluate.add_argument("--height", type=int, default=128)
    evaluate.add_argument("--caption-steps", type=int, help="longest caption in tokens (default: the config's)")
    evaluate.add_argument("--retrieval-decoder-weight", type=float, default=0.5, help=DECODER_WEIGHT_HELP)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=evaluate_command)

    model = sub.add_parser("model", help="inspect X-Decoder configs and checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="describe a config; with --checkpoint, load it strictly")
    info.add_argument("--config", default="focalt", help="focalt, focall, davitd3, davitd5, parity")
    info.add_argument("--checkpoint", help="local .pt/.safetensors path or hf://owner/repo/file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=model_info)

    bundle = model_sub.add_parser("bundle", help="evaluate a finished training run on held-out synthetic scenes "
                                                 "and install it as the bundled model (make train-demo)")
    bundle.add_argument("run", help="the training run's folder (xdlabel train --out)")
    bundle.add_argument("--width", type=int, default=96)
    bundle.add_argument("--height", type=int, default=64)
    bundle.add_argument("--scenes", type=int, default=100)
    bundle.add_argument("--caption-steps", type=int, default=24, help="longest caption, in tokens")
    bundle.add_argument("--retrieval-decoder-weight", type=float, default=0.5,
                        help=DECODER_WEIGHT_HELP + "; chosen on validation draws, recorded with the model")
    bundle.add_argument("--seed", type=int, default=12345, help="held out: training uses other seeds")
    bundle.add_argument("--json", action="store_true")
    bundle.set_defaults(func=model_bundle)


def model_info(args: argparse.Namespace) -> int:
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
    emit(info, args.json)
    return 0


def model_bundle(args: argparse.Namespace) -> int:
    """Evaluate a training run on held-out scenes and install it as the bundled model."""
    import hashlib
    import shutil
    from pathlib import Path

    import xdecoder.training.synthetic as synthetic
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.checkpoint import file_sha256
    from xdecoder.training.evaluate import evaluate
    from xdlabel.settings import BUNDLED_CHECKPOINT

    run = Path(args.run)
    meta = json.loads((run / "meta.json").read_text())
    if meta["step"] < meta["train"]["steps"]:
        raise ValueError(f"{run} stopped at step {meta['step']} of {meta['train']['steps']}: finish the run first")
    model = build_model(meta["config"])
    load_checkpoint(model, run / "model.safetensors")
    predictor = Predictor(model, device="cpu", settings=synthetic_reading(args))
    size = (args.width, args.height)
    metrics = evaluate(predictor, synthetic.make_scenes(args.scenes, seed=args.seed, size=size))
    BUNDLED_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "model.safetensors", BUNDLED_CHECKPOINT)
    info = {
        "config": meta["config"], "classes": meta["classes"], "stuff": list(synthetic.STUFF),
        "short_side": args.height, "caption_steps": args.caption_steps,
        "retrieval_decoder_weight": args.retrieval_decoder_weight, "train_size": list(size),
        "training": meta["train"],
        "training_data": {"generator": "xdecoder.training.synthetic", "seed": meta["train"]["seed"],
                          "generator_sha256": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
                          **({"init_sha256": meta["training_data"]["init"]} if "init" in meta.get("training_data", {})
                             else {})},
        "heldout": {"seed": args.seed, "scenes": args.scenes, "metrics": metrics},
        "sha256": file_sha256(BUNDLED_CHECKPOINT),
    }
    BUNDLED_CHECKPOINT.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    emit({"bundled": str(BUNDLED_CHECKPOINT), **{k: v for k, v in metrics.items() if "/" not in k}}, args.json)
    return 0


def finetune_command(args: argparse.Namespace) -> int:
    """Fine-tune on labelled data (a Label Studio project or a COCO file) with held-out metrics."""
    from pathlib import Path

    from tqdm import tqdm

    from annotator.dataset import scenes_from_coco
    from index.db import make_engine, make_session_factory, upgrade
    from xdlabel.finetune import FinetuneOptions, coco_image_reader, describe, finetune, labelstudio_data

    settings = settings_of(args)
    upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    sessions = make_session_factory(engine)
    size = (args.width, args.height)
    if args.coco:
        root = Path(args.image_root) if args.image_root else Path(args.coco).parent
        client = labelstudio_client(settings) if settings.ls_url and settings.ls_token else None
        reader = coco_image_reader(root, client, settings.max_image_bytes)
        data = scenes_from_coco(Path(args.coco), size, Path(args.image_root) if args.image_root else None,
                                Path(args.captions) if args.captions else None, read_image=reader)
    else:
        data = labelstudio_data(labelstudio_client(settings), args.from_labelstudio, size,
                                sessions if args.from_store else None, settings.max_image_bytes)
    options = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              freeze_backbone=args.freeze_backbone, freeze_text=args.freeze_text)
    bar = tqdm(total=args.steps, unit="step", disable=args.json)
    report = finetune(args.config or settings.model, args.init or settings.checkpoint, data.scenes,
                      data.class_names, data.stuff, Path(args.out), options, data_digest=data.digest,
                      sessions=sessions, log=lambda step, record: bar.update(1))
    bar.close()
    engine.dispose()
    emit({**describe(report), "skipped": data.skipped}, args.json)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    if args.from_labelstudio is not None or args.coco:
        return finetune_command(args)
    args.config = args.config or "parity"
    import torch

    torch.manual_seed(args.seed)  # the initial weights too: same seed, same run

    from xdecoder import build_model, load_checkpoint
    from xdecoder.training.losses import LossWeights
    from xdecoder.training.trainer import TrainConfig, Trainer, synthetic_batches

    model = build_model(args.config)
    if args.init:
        load_checkpoint(model, args.init)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      freeze_backbone=args.freeze_backbone, freeze_text=args.freeze_text,
                      checkpoint_every=args.checkpoint_every, near_misses=args.near_misses,
                      min_width=args.min_width, portrait=args.portrait,
                      weights=LossWeights(no_object=args.no_object_weight, names=args.name_separation,
                                          retrieval=args.retrieval_weight))
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
    if args.init:  # a second stage: what it started from is part of how the weights were made
        init = args.init
        data["init"] = init if init.startswith("hf://") else hashlib.sha256(Path(init).read_bytes()).hexdigest()
    history = trainer.fit(synthetic_batches(cfg, (args.width, args.height)), folder=out, log=log,
                          meta={"training_data": data})
    bar.close()
    summary = {"checkpoint": str(out), "resumed_from_step": resumed and (cfg.steps - len(history)),
               "steps": trainer.step, "final_loss": history[-1]["loss"] if history else None}
    print(json.dumps(summary, indent=2))
    return 0


def synthetic_reading(args: argparse.Namespace) -> PredictorSettings:
    """How `eval` and `model bundle` read the synthetic scenes: at their height, with the given caption
    length and retrieval weight."""
    from xdecoder.predictor import PredictorSettings

    return PredictorSettings(short_side=args.height, caption_steps=args.caption_steps,
                             retrieval_decoder_weight=args.retrieval_decoder_weight)


def evaluate_command(args: argparse.Namespace) -> int:
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.training.evaluate import evaluate
    from xdecoder.training.synthetic import make_scenes

    model = build_model(args.config)
    load_checkpoint(model, args.checkpoint)
    predictor = Predictor(model, settings=synthetic_reading(args))
    metrics = evaluate(predictor, make_scenes(args.scenes, seed=args.seed, size=(args.width, args.height)))
    emit(dict(metrics), args.json)
    return 0

"""Fine-tune X-Decoder on human-corrected labels and keep the result only if it is better.

The scenes are split deterministically (every ``holdout_every``-th scene held out); the held-out
metrics are measured before and after training with the same code. "Better" is decided on the
per-image change of mIoU over the held-out images: with at least ``min_heldout`` of them, the new
checkpoint is registered as a model version only when the bootstrap interval of the mean change
(``confidence``, scipy's percentile bootstrap, seeded) lies above zero; with fewer, nothing is
decided and nothing registered, and the report says why.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from annotator.client import LabelStudioClient
from annotator.dataset import LabelledData, scenes_from_tasks
from annotator.export import tasks_from_store
from annotator.labeling import parse_labeling_config
from annotator.project import task_image_url
from index.repository import get_or_create_model_version
from xdecoder import Predictor, build_model, load_checkpoint
from xdecoder.checkpoint import file_sha256
from xdecoder.predictor import PredictorSettings
from xdecoder.training.evaluate import evaluate
from xdecoder.training.synthetic import Scene
from xdecoder.training.trainer import TrainConfig, Trainer
from xdecoder.transforms import read_image
from xdlabel.services import version_name


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    holdout_every: int = 4
    freeze_backbone: bool = False
    freeze_text: bool = False
    metric: str = "miou"  # the aggregate metric reported first
    min_heldout: int = 10  # held-out images needed to decide "better"
    confidence: float = 0.95


@dataclass
class FinetuneReport:
    before: dict[str, float]
    after: dict[str, float]
    improved: bool
    checkpoint: Path
    model_version: str | None = None  # registered only when improved
    train_scenes: int = 0
    heldout_scenes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    interval: tuple[float, float] | None = None  # of the mean per-image mIoU change, after - before
    mean_change: float = 0.0
    decision: str = ""


def split(scenes: Sequence[Scene], every: int) -> tuple[list[Scene], list[Scene]]:
    if len(scenes) < 2:
        raise ValueError(f"fine-tuning needs at least 2 labelled images (one held out), got {len(scenes)}")
    held = [s for i, s in enumerate(scenes) if i % every == every - 1] or [scenes[-1]]
    train = [s for s in scenes if not any(s is h for h in held)]
    return train, held


def finetune(config: str, init: str, scenes: Sequence[Scene], class_names: Sequence[str], stuff: Sequence[str],
             out: Path, options: FinetuneOptions = FinetuneOptions(), *, data_digest: str = "",
             sessions: sessionmaker[Session] | None = None,
             log: Callable[[int, dict[str, float]], None] | None = None) -> FinetuneReport:
    train, held = split(scenes, options.holdout_every)
    height, width = scenes[0].image.shape[:2]
    model = build_model(config)
    load_checkpoint(model, init)
    def measure() -> tuple[dict[str, float], np.ndarray]:
        # A new predictor each time: a predictor caches class-name embeddings, which training changes.
        predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=min(height, width)))
        return evaluate(predictor, held, class_names, stuff), per_image_miou(predictor, held, class_names)

    before, before_images = measure()
    cfg = TrainConfig(steps=options.steps, batch_size=options.batch_size, lr=options.lr, seed=options.seed,
                      freeze_backbone=options.freeze_backbone, freeze_text=options.freeze_text,
                      checkpoint_every=max(options.steps, 1), warmup=min(20, options.steps))
    trainer = Trainer(model, cfg, class_names)

    def batch(step: int) -> list[Scene]:
        rng = random.Random(options.seed * 1_000_003 + step)
        return [train[rng.randrange(len(train))] for _ in range(options.batch_size)]

    trainer.fit(batch, folder=out, log=log)
    after, after_images = measure()
    improved, interval, decision = decide(after_images - before_images, options)
    checkpoint = out / "model.safetensors"
    trainer.save(out, {"init": init, "training_data_sha256": data_digest, "before": before, "after": after,
                       "improved": improved, "stuff": list(stuff)})
    report = FinetuneReport(before, after, improved, checkpoint, train_scenes=len(train), heldout_scenes=len(held),
                            interval=interval, mean_change=float(np.mean(after_images - before_images)),
                            decision=decision)
    if improved and sessions is not None:
        sha = file_sha256(checkpoint)
        with sessions() as session:
            version = get_or_create_model_version(session, name=version_name(config, sha), checkpoint_sha256=sha,
                                                  embedding_dim=model.config.dim_proj)
            session.commit()
            report.model_version = version.name
    return report


def per_image_miou(predictor: Predictor, scenes: Sequence[Scene], class_names: Sequence[str]) -> np.ndarray:
    """Each image's mean IoU over the classes in its ground truth or its prediction (the semantic
    map scored as ``evaluate`` scores it, one image at a time)."""
    names = list(class_names)
    values = []
    for scene in scenes:
        label_map = predictor.semantic(predictor.encode(scene.image), names)[0].label_map
        truth = np.zeros_like(label_map)
        for segment in scene.segments:
            truth[scene.mask(segment.id)] = segment.category_id
        ious = []
        for c in np.union1d(np.unique(label_map), np.unique(truth)):
            p, g = label_map == c, truth == c
            ious.append(np.logical_and(p, g).sum() / np.logical_or(p, g).sum())
        values.append(float(np.mean(ious)))
    return np.asarray(values, dtype=np.float64)


def decide(changes: np.ndarray, options: FinetuneOptions) -> tuple[bool, tuple[float, float] | None, str]:
    """Whether the per-image changes show the new checkpoint better: the bootstrap interval of their
    mean above zero, on at least ``options.min_heldout`` images."""
    from scipy.stats import bootstrap

    n, mean = len(changes), float(np.mean(changes)) if len(changes) else 0.0
    interval: tuple[float, float] | None = None
    if n >= 2 and np.ptp(changes) > 0:
        ci = bootstrap((changes,), np.mean, confidence_level=options.confidence, n_resamples=2000,
                       method="percentile", random_state=options.seed).confidence_interval
        interval = (float(ci.low), float(ci.high))
    elif n >= 1:
        interval = (mean, mean)  # every image changed alike
    shown = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "none"
    what = f"mean per-image mIoU change {mean:+.4f} over {n} held-out images, {options.confidence:.0%} interval {shown}"
    if n < options.min_heldout:
        return False, interval, f"not decided: {what}; {options.min_heldout} held-out images are needed"
    better = interval is not None and interval[0] > 0
    return better, interval, f"{'better' if better else 'not better'}: {what}"


def labelstudio_data(client: LabelStudioClient, project_id: int, size: tuple[int, int],
                     store: sessionmaker[Session] | None = None, max_image_bytes: int = 100 * 1024 * 1024
                     ) -> LabelledData:
    """A project's annotations as scenes: read live from Label Studio, or (``store``) the ones
    xdlabel received by webhook; images are read from Label Studio either way."""
    config = parse_labeling_config(client.project(project_id)["label_config"])
    if store is not None:
        with store() as session:
            tasks = tasks_from_store(session, project_id)
    else:
        tasks = list(client.tasks(project_id))

    def read(task: dict[str, Any]) -> Any:
        return read_image(client.read_file(task_image_url(task, config), max_image_bytes))[0]

    return scenes_from_tasks(tasks, read, config, size)


def coco_image_reader(root: Path, client: LabelStudioClient | None, max_bytes: int
                      ) -> Callable[[dict[str, Any]], np.ndarray]:
    """A COCO entry's image: ``file_name`` under ``root``, or, in a file exported from Label Studio,
    a Label Studio URL read with its auth (when a client is given)."""
    def read(entry: dict[str, Any]) -> np.ndarray:
        url = entry.get("coco_url") or entry["file_name"]  # xdlabel export keeps the URL in coco_url
        if client is not None and url.startswith(("/data/", "http://", "https://")):
            return read_image(client.read_file(url, max_bytes))[0]
        return read_image((root / entry["file_name"]).read_bytes())[0]

    return read


def describe(report: FinetuneReport) -> dict[str, Any]:
    return {"checkpoint": str(report.checkpoint), "improved": report.improved,
            "model_version": report.model_version, "train_scenes": report.train_scenes,
            "heldout_scenes": report.heldout_scenes, "before": report.before, "after": report.after,
            "mean_change": report.mean_change, "interval": report.interval, "decision": report.decision}

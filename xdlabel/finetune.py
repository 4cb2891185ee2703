"""Fine-tune X-Decoder on human-corrected labels and keep the result only if it is better.

The scenes are split deterministically (every ``holdout_every``-th scene held out); the held-out
metrics are measured before and after training with the same code, and the new checkpoint is
registered as a model version only when its held-out mIoU beats the starting one.
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
    metric: str = "miou"  # what "better" means


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
    def measure() -> dict[str, float]:
        # A new predictor each time: a predictor caches class-name embeddings, which training changes.
        predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=min(height, width)))
        return evaluate(predictor, held, class_names, stuff)

    before = measure()
    cfg = TrainConfig(steps=options.steps, batch_size=options.batch_size, lr=options.lr, seed=options.seed,
                      freeze_backbone=options.freeze_backbone, freeze_text=options.freeze_text,
                      checkpoint_every=max(options.steps, 1), warmup=min(20, options.steps))
    trainer = Trainer(model, cfg, class_names)

    def batch(step: int) -> list[Scene]:
        rng = random.Random(options.seed * 1_000_003 + step)
        return [train[rng.randrange(len(train))] for _ in range(options.batch_size)]

    trainer.fit(batch, folder=out, log=log)
    after = measure()
    improved = after[options.metric] > before[options.metric]
    checkpoint = out / "model.safetensors"
    trainer.save(out, {"init": init, "training_data_sha256": data_digest, "before": before, "after": after,
                       "improved": improved, "stuff": list(stuff)})
    report = FinetuneReport(before, after, improved, checkpoint, train_scenes=len(train), heldout_scenes=len(held))
    if improved and sessions is not None:
        sha = file_sha256(checkpoint)
        with sessions() as session:
            version = get_or_create_model_version(session, name=version_name(config, sha), checkpoint_sha256=sha,
                                                  embedding_dim=model.config.dim_proj)
            session.commit()
            report.model_version = version.name
    return report


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
        name = entry["file_name"]
        if client is not None and name.startswith(("/data/", "http://", "https://")):
            return read_image(client.read_file(name, max_bytes))[0]
        return read_image((root / name).read_bytes())[0]

    return read


def describe(report: FinetuneReport) -> dict[str, Any]:
    return {"checkpoint": str(report.checkpoint), "improved": report.improved,
            "model_version": report.model_version, "train_scenes": report.train_scenes,
            "heldout_scenes": report.heldout_scenes, "before": report.before, "after": report.after}

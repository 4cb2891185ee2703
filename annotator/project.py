"""Pre-label a Label Studio project: read its tasks and images, run X-Decoder once per image, queue
the predictions in the SQL outbox, deliver them in bulk."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotator.client import LabelStudioClient, LabelStudioUnavailable, Task
from annotator.labeling import LabelingConfig, parse_labeling_config
from annotator.outbox import DeliveryReport, Outbox, Outgoing, enqueue
from annotator.prelabel import PrelabelSettings, predictions
from index.models import LabelStudioDelivery
from xdecoder.predictor import Predictor
from xdecoder.transforms import read_image

log = logging.getLogger(__name__)


@dataclass
class PrelabelReport:
    tasks: int = 0
    predicted: int = 0
    skipped: int = 0  # already predicted by this model version, or already queued
    failed: dict[int, str] = field(default_factory=dict)  # task id -> reason
    delivery: DeliveryReport = field(default_factory=DeliveryReport)


@dataclass(frozen=True)
class PrelabelOptions:
    batch_size: int = 4
    task: str = "auto"  # auto | panoptic | instance | semantic
    default_threshold: float = 0.5
    thresholds: Mapping[str, float] = field(default_factory=dict)
    max_image_bytes: int = 100 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    deliver_wait: float = 0.0  # seconds to keep retrying an unreachable Label Studio at the end
    prelabel: PrelabelSettings = PrelabelSettings()


def task_image_url(task: Task, config: LabelingConfig) -> str:
    url = task.get("data", {}).get(config.image_key)
    if not isinstance(url, str) or not url:
        raise ValueError(f"the task has no {config.image_key!r} field holding an image URL")
    return url


def _chunks(items: list[Task], size: int) -> Iterator[list[Task]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def prelabel_project(predictor: Predictor, client: LabelStudioClient, sessions: sessionmaker[Session],
                     project_id: int, model_version: str, options: PrelabelOptions = PrelabelOptions(),
                     progress: Callable[[PrelabelReport], None] | None = None) -> PrelabelReport:
    project = client.project(project_id)
    config = parse_labeling_config(project["label_config"], options.task, options.default_threshold,
                                   options.thresholds)
    outbox = Outbox(sessions, client)
    report = PrelabelReport()
    with sessions() as session:
        queued = set(session.scalars(select(LabelStudioDelivery.task_id).where(
            LabelStudioDelivery.server == client.url, LabelStudioDelivery.project_id == project_id,
            LabelStudioDelivery.model_version == model_version)))
    todo = []
    for task in client.tasks(project_id):
        report.tasks += 1
        done = any(p.get("model_version") == model_version for p in task.get("predictions", []))
        if done or task["id"] in queued:
            report.skipped += 1
        else:
            todo.append(task)
    for chunk in _chunks(todo, options.batch_size):
        images: list[np.ndarray] = []
        readable: list[Task] = []
        for task in chunk:
            try:
                data = client.read_file(task_image_url(task, config), options.max_image_bytes)
                images.append(read_image(data, options.max_image_pixels)[0])
                readable.append(task)
            except LabelStudioUnavailable:
                raise
            except Exception as err:  # noqa: BLE001 - one bad task is recorded; the rest go on
                report.failed[task["id"]] = f"{type(err).__name__}: {err}"
        if readable:
            out = predictions(predictor, predictor.encode(images), config, model_version, options.prelabel)
            with sessions() as session:
                enqueue(session, client.url, [Outgoing(project_id, t["id"], p)
                                              for t, p in zip(readable, out, strict=True)])
                session.commit()
            report.predicted += len(readable)
        if outbox.counts().get("pending", 0) >= outbox.chunk_size:
            _accumulate(report.delivery, outbox.deliver())
        if progress:
            progress(report)
    _accumulate(report.delivery, outbox.deliver(wait=options.deliver_wait))
    return report


def _accumulate(total: DeliveryReport, part: DeliveryReport) -> None:
    total.delivered += part.delivered
    total.failed += part.failed
    total.requests += part.requests
    total.pending, total.error = part.pending, part.error


def describe(report: PrelabelReport) -> dict[str, Any]:
    return {"tasks": report.tasks, "predicted": report.predicted, "skipped": report.skipped,
            "failed": {str(k): v for k, v in report.failed.items()}, "delivered": report.delivery.delivered,
            "delivery_failed": report.delivery.failed, "pending": report.delivery.pending,
            "requests": report.delivery.requests, "delivery_error": report.delivery.error}

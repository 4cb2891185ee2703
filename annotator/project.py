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

from annotator.client import LabelStudioAuthError, LabelStudioClient, LabelStudioUnavailable, Task
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
    skipped: int = 0  # already predicted by this model version, or already queued (unless forced)
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
    force: bool = False  # predict again even tasks that hold (or have queued) one of this model version
    task_ids: frozenset[int] = frozenset()  # only these tasks (empty: all of the project's)


def task_image_url(task: Task, config: LabelingConfig) -> str:
    url = task.get("data", {}).get(config.image_key)
    if not isinstance(url, str) or not url:
        raise ValueError(f"the task has no {config.image_key!r} field holding an image URL")
    return url


class TaskFailed(Exception):
    """This task cannot be pre-labelled (its image unreadable, missing or too large); the others can."""


def _read_task_image(client: LabelStudioClient, task: Task, config: LabelingConfig,
                     options: PrelabelOptions) -> np.ndarray:
    """The task's image; any error of this one task becomes TaskFailed with its reason. A refused
    token, or a Label Studio whose API does not answer either, stops the run instead."""
    url = None
    try:
        url = task_image_url(task, config)
        data = client.read_file(url, options.max_image_bytes)
        return read_image(data, options.max_image_pixels)[0]
    except LabelStudioAuthError:
        raise
    except LabelStudioUnavailable as err:
        own = url is None or client.is_own_url(url)
        if own and not client.alive():
            raise
        # A foreign host that does not answer (or Label Studio failing to serve one file) is
        # this task's failure, told as what it is: the error under Label Studio's wrapper.
        raise TaskFailed(_reason(url, err.__cause__ if err.__cause__ is not None and not own else err)) from err
    except Exception as err:  # noqa: BLE001 - one bad task is recorded; the rest go on
        raise TaskFailed(_reason(url, err)) from err


def _reason(url: str | None, err: BaseException) -> str:
    detail = f"{type(err).__name__}: {err}"
    return detail if url is None or url in detail else f"cannot read {url}: {detail}"


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
    todo: list[Task] = []
    replace: set[int] = set()  # forced tasks that hold or have queued one already
    for task in client.tasks(project_id):
        if options.task_ids and task["id"] not in options.task_ids:
            continue
        report.tasks += 1
        done = any(p.get("model_version") == model_version for p in task.get("predictions", []))
        if (done or task["id"] in queued) and not options.force:
            report.skipped += 1
            continue
        todo.append(task)
        if done or task["id"] in queued:
            replace.add(task["id"])
    for chunk in _chunks(todo, options.batch_size):
        images: list[np.ndarray] = []
        readable: list[Task] = []
        for task in chunk:
            try:
                images.append(_read_task_image(client, task, config, options))
                readable.append(task)
            except TaskFailed as err:
                report.failed[task["id"]] = str(err)
                log.warning("task %s: %s", task["id"], err)
        if readable:
            out = predictions(predictor, predictor.encode(images), config, model_version, options.prelabel)
            with sessions() as session:
                enqueue(session, client.url, [Outgoing(project_id, t["id"], p, replace=t["id"] in replace)
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

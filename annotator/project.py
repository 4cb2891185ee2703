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

from annotator.client import LabelStudioAuthError, LabelStudioClient, LabelStudioError, LabelStudioUnavailable, Task
from annotator.labeling import LabelingConfig, parse_labeling_config
from annotator.outbox import DeliveryReport, Outbox, Outgoing, enqueue
from annotator.prelabel import LabelTally, PrelabelSettings, predictions
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
    labels: list[dict[str, Any]] = field(default_factory=list)  # per control and label (LabelTally.summary)
    warnings: list[str] = field(default_factory=list)  # settings naming labels the config lacks


@dataclass(frozen=True)
class PrelabelOptions:
    batch_size: int = 4
    task: str = "auto"  # auto | panoptic | instance | semantic
    default_threshold: float = 0.5
    thresholds: Mapping[str, float] = field(default_factory=dict)  # "label" or "control:label" -> score
    threshold: float | None = None  # wins over every other threshold (prelabel --threshold)
    label_map: Mapping[str, str] = field(default_factory=dict)  # phrase -> label value: extra prompts
    routing: str = "tool"  # tool | every (annotator.labeling)
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


def project_config(client: LabelStudioClient, project_id: int, options: PrelabelOptions = PrelabelOptions()
                   ) -> LabelingConfig:
    """The project's labeling config as xdlabel reads it; a wrong URL, token or project id raises
    here, as one readable line, before anything loads the model."""
    try:
        project = client.project(project_id)
    except LabelStudioError as err:
        if err.status_code == 404:
            raise ValueError(f"Label Studio at {client.url} has no project {project_id} (404)") from None
        raise
    return parse_labeling_config(project["label_config"], options.task, options.default_threshold,
                                 options.thresholds, mapping=options.label_map, routing=options.routing,
                                 override=options.threshold)


@dataclass
class TaskPlan:
    todo: list[Task] = field(default_factory=list)
    # tasks whose outbox row (or Label Studio prediction) the new one replaces
    replace: set[int] = field(default_factory=set)


def plan_tasks(client: LabelStudioClient, sessions: sessionmaker[Session], project_id: int, model_version: str,
               options: PrelabelOptions, report: PrelabelReport) -> TaskPlan:
    """The project's tasks to pre-label now (image and video projects alike), counted into ``report``."""
    with sessions() as session:
        rows = session.execute(select(LabelStudioDelivery.task_id, LabelStudioDelivery.state).where(
            LabelStudioDelivery.server == client.url, LabelStudioDelivery.project_id == project_id,
            LabelStudioDelivery.model_version == model_version)).all()
    # Still on its way (pending, sending, being computed, failed: `labelstudio requeue`) counts as
    # done; one Label Studio received (delivered, or answered to its /ml/predict) counts only while
    # Label Studio still holds it, so deleting predictions there and running again redoes those.
    queued = {task_id for task_id, state in rows if state not in ("delivered", "answered")}
    known = {task_id for task_id, _ in rows}
    plan = TaskPlan()
    for task in client.tasks(project_id):
        if options.task_ids and task["id"] not in options.task_ids:
            continue
        report.tasks += 1
        done = any(p.get("model_version") == model_version for p in task.get("predictions", []))
        if (done or task["id"] in queued) and not options.force:
            report.skipped += 1
            continue
        plan.todo.append(task)
        if done or task["id"] in known:
            plan.replace.add(task["id"])
    return plan


def prelabel_project(predictor: Predictor | Callable[[], Predictor], client: LabelStudioClient,
                     sessions: sessionmaker[Session], project_id: int, model_version: str,
                     options: PrelabelOptions = PrelabelOptions(),
                     progress: Callable[[PrelabelReport], None] | None = None,
                     preview: Callable[[int, np.ndarray, dict[str, Any]], None] | None = None) -> PrelabelReport:
    """``predictor`` may be a function giving it, called only once there is work to do (after the
    project, its config and its tasks were read). ``preview`` sees each task's id, image and prediction."""
    config = project_config(client, project_id, options)
    outbox = Outbox(sessions, client)
    report = PrelabelReport(warnings=list(config.warnings))
    for warning in config.warnings:
        log.warning("project %s: %s", project_id, warning)
    tally = LabelTally()
    plan = plan_tasks(client, sessions, project_id, model_version, options, report)
    model = predictor if isinstance(predictor, Predictor) or not plan.todo else predictor()
    for chunk in _chunks(plan.todo, options.batch_size):
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
            assert isinstance(model, Predictor)
            out = predictions(model, model.encode(images), config, model_version, options.prelabel, tally=tally)
            for task, image, prediction in zip(readable, images, out, strict=True):
                if preview:
                    preview(task["id"], image, prediction)
            with sessions() as session:
                enqueue(session, client.url, [Outgoing(project_id, t["id"], p, replace=t["id"] in plan.replace)
                                              for t, p in zip(readable, out, strict=True)])
                session.commit()
            report.predicted += len(readable)
        if outbox.counts().get("pending", 0) >= outbox.chunk_size:
            _accumulate(report.delivery, outbox.deliver())
        if progress:
            progress(report)
    _accumulate(report.delivery, outbox.deliver(wait=options.deliver_wait))
    report.labels = tally.summary(config)
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
            "requests": report.delivery.requests, "delivery_error": report.delivery.error,
            "labels": report.labels, "warnings": report.warnings}


def label_summary(report: PrelabelReport) -> str:
    """The per-label table printed at the end of a run: regions made, dropped under the threshold,
    the labels the model never proposed, and apart from them those routing sends nothing to."""
    if not report.labels:
        return ""
    width = max(len(f"{r['control']}:{r['label']}") for r in report.labels)
    lines = [f"{'control:label':<{width}}  regions  under threshold  threshold"]
    for r in report.labels:
        name = f"{r['control']}:{r['label']}"
        lines.append(f"{name:<{width}}  {r['regions']:>7}  {r['under_threshold']:>15}  {r['threshold']:>9}")
    never = [f"{r['control']}:{r['label']}" for r in report.labels if not r["found"] and r.get("routed", True)]
    if never and report.predicted:
        lines.append(f"never found: {', '.join(never)}")
    elsewhere = [f"{r['control']}:{r['label']}" for r in report.labels if not r.get("routed", True)]
    if elsewhere:  # XDLABEL_LS_ROUTING=tool sends those labels' regions to another control only
        lines.append(f"not routed here (their tool is another control): {', '.join(elsewhere)}")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)

"""Pre-label a Label Studio video project: each task's video read from Label Studio, its sampled
frames through X-Decoder in batches, detections linked into tracks (``annotator.video_tracks``),
one prediction per task queued in the SQL outbox and delivered in bulk, as image projects are.

Detections per frame, by ``mode``: ``instance`` (X-Decoder's instance head over the labels' prompts:
any number of objects per label) or ``ground`` (referring segmentation of each label's prompts: at
most one object per label per frame, for models whose grounding is stronger than their instance
head, as the small bundled model's is).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from annotator.client import LabelStudioAuthError, LabelStudioClient, LabelStudioError
from annotator.convert import mask_to_box
from annotator.outbox import Outbox, Outgoing, enqueue
from annotator.prelabel import Prediction, regions
from annotator.project import PrelabelOptions, PrelabelReport, _accumulate, plan_tasks
from annotator.video_tracks import (
    Detection,
    Linker,
    VideoConfig,
    caption_result,
    caption_segments,
    is_video_config,
    parse_video_config,
    track_result,
)
from xdecoder.predictor import Features, Predictor
from xdlabel.video import Sampling, VideoLimits, open_video, sample_frames

log = logging.getLogger(__name__)
MODES = ("instance", "ground")


@dataclass(frozen=True)
class VideoOptions:
    sampling: Sampling = Sampling(fps=2.0)
    mode: str = "instance"  # instance | ground
    limits: VideoLimits = VideoLimits()
    max_video_bytes: int = 1024**3  # a task's video is read into memory
    min_affinity: float = 0.2  # Linker: least IoU (mask, or motion-predicted box) to continue a track
    max_missed: int = 1  # sampled frames a track may miss and go on
    min_keyframes: int = 2  # shorter tracks are dropped (one-frame flickers)
    frames_per_batch: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"video pre-labels take --task instance or ground (auto: instance), not {self.mode!r}")


def video_project_config(client: LabelStudioClient, project_id: int,
                         options: PrelabelOptions | None = None) -> VideoConfig | None:
    """The project's video config, or None when its config has no <Video> (an image project)."""
    options = options or PrelabelOptions()
    try:
        xml = client.project(project_id)["label_config"]
    except LabelStudioError as err:
        if err.status_code == 404:
            raise ValueError(f"Label Studio at {client.url} has no project {project_id} (404)") from None
        raise
    if not is_video_config(xml):
        return None
    return parse_video_config(xml, options.default_threshold, options.thresholds, mapping=options.label_map,
                              override=options.threshold)


def detect(predictor: Predictor, features: Features, config: VideoConfig, mode: str,
           min_area: int = 4) -> list[list[Detection]]:
    """The detections of each encoded frame, each under its control's label and threshold."""
    labels = config.labels
    out: list[list[Detection]] = [[] for _ in features]
    if mode == "instance":
        for k, frame_regions in enumerate(regions(predictor, features, labels)):
            for region in frame_regions:
                routes = labels.routes.get(region.label, ())
                box = mask_to_box(region.mask)
                if not routes or box is None or region.mask.sum() < min_area:
                    continue
                target, label = routes[0]
                if region.score >= target.thresholds.get(label, 0.0):
                    out[k].append(Detection(label, box, region.score, region.mask))
        return out
    phrases: list[tuple[str, float, str]] = []  # (label, its threshold, prompt)
    for target in labels.targets:
        for label in target.labels:
            phrases += [(label, target.thresholds.get(label, 0.0), p)
                        for p in target.vocabulary.prompts.get(label, (label,))]
    if not phrases:
        return out
    for k, grounded in enumerate(predictor.ground(features, [p for _, _, p in phrases])):
        # Grounding always picks some query, so a label absent from the frame lands on another label's
        # object; a query is one object, and its label is the one whose phrase matches it best.
        claims: dict[int, tuple[float, str]] = {}
        for (label, _, _), g in zip(phrases, grounded, strict=True):
            if g.query not in claims or g.score > claims[g.query][0]:
                claims[g.query] = (g.score, label)
        best: dict[str, Detection] = {}  # a label's best prompt
        for (label, threshold, _), g in zip(phrases, grounded, strict=True):
            if claims[g.query][1] != label:
                continue
            box = mask_to_box(g.mask)
            if box is None or g.mask.sum() < min_area:
                continue
            score = float((1.0 / (1.0 + np.exp(-g.logits[g.mask]))).mean())
            if score >= threshold and (label not in best or score > best[label].score):
                best[label] = Detection(label, box, score, np.asarray(g.mask, dtype=bool))
        out[k] = list(best.values())
    return out


def predict_video(predictor: Predictor, data: bytes, config: VideoConfig, model_version: str,
                  options: VideoOptions, captions: bool = True) -> Prediction:
    """One task's prediction: its tracks (and caption segments when the config has a TextArea)."""
    linker = Linker(options.min_affinity, options.max_missed, options.min_keyframes)
    times: list[float] = []
    texts: list[str] = []
    size = (0, 0)
    with closing(io.BytesIO(data)) as source:
        container, stream, info = open_video(source, options.limits)
        with closing(container):
            batch: list[tuple[float, np.ndarray]] = []

            def run(batch: Sequence[tuple[float, np.ndarray]]) -> None:
                features = predictor.encode([rgb for _, rgb in batch])
                for (t, _), found in zip(batch, detect(predictor, features, config, options.mode), strict=True):
                    linker.add(t, found)
                    times.append(t)
                if captions and config.labels.caption:
                    texts.extend(predictor.caption(features))

            for frame in sample_frames(container, stream, info, options.sampling, options.limits):
                size = (frame.rgb.shape[1], frame.rgb.shape[0])
                batch.append((frame.timestamp, frame.rgb))
                if len(batch) == options.frames_per_batch:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
    step = 1.0 / info.fps if info.fps else 0.0
    duration = info.duration if info.duration else (times[-1] + step if times else 0.0)
    tracks = linker.finish()
    result = [track_result(t, config, size, round(duration, 4), f"xd{k}") for k, t in enumerate(tracks)]
    if texts:
        result.append(caption_result(caption_segments(times, texts, duration), config))
    score = float(np.mean([t.score for t in tracks])) if tracks else 0.0
    return {"result": result, "score": round(score, 4), "model_version": model_version}


def prelabel_video_project(predictor: Predictor | Callable[[], Predictor], client: LabelStudioClient,
                           sessions: sessionmaker[Session], project_id: int, model_version: str,
                           options: PrelabelOptions | None = None, video: VideoOptions | None = None,
                           progress: Callable[[PrelabelReport], None] | None = None) -> PrelabelReport:
    """Every task's video pre-labelled and delivered; a task whose video cannot be read or decoded
    is recorded in ``failed`` with the reason and the others go on."""
    options, video = options or PrelabelOptions(), video or VideoOptions()
    config = video_project_config(client, project_id, options)
    if config is None:
        raise ValueError(f"project {project_id} has no <Video> in its labeling config")
    report = PrelabelReport(warnings=list(config.labels.warnings))
    outbox = Outbox(sessions, client)
    plan = plan_tasks(client, sessions, project_id, model_version, options, report)
    model = predictor if isinstance(predictor, Predictor) or not plan.todo else predictor()
    for task in plan.todo:
        url = task.get("data", {}).get(config.video_key)
        try:
            if not isinstance(url, str) or not url:
                raise ValueError(f"the task has no {config.video_key!r} field holding a video URL")
            data = client.read_file(url, video.max_video_bytes)
            assert isinstance(model, Predictor)
            prediction = predict_video(model, data, config, model_version, video, options.prelabel.captions)
        except LabelStudioAuthError:
            raise
        except Exception as err:  # noqa: BLE001 - one bad video is recorded; the rest go on
            report.failed[task["id"]] = f"cannot pre-label {url}: {type(err).__name__}: {err}"
            log.warning("task %s: %s", task["id"], report.failed[task["id"]])
            continue
        with sessions() as session:
            enqueue(session, client.url, [Outgoing(project_id, task["id"], prediction,
                                                   replace=task["id"] in plan.replace)])
            session.commit()
        report.predicted += 1
        if progress:
            progress(report)
    _accumulate(report.delivery, outbox.deliver(wait=options.deliver_wait))
    return report

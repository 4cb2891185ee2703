"""Video pre-labels for Label Studio: a project's ``<Video>`` config, per-frame detections linked
into tracks, tracks as ``videorectangle`` results with keyframes.

The config: a ``<Video>`` tag, a ``<VideoRectangle>`` on it and a ``<Labels>`` on it whose labels
(with ``predicted_values``, ``model_score_threshold`` and the rest, as for images) name what to
find; optionally a ``<TextArea>`` on it for captions. It is read by translating it into the image
config xdlabel already reads (``RectangleLabels`` holding the same labels), so prompts, mappings and
thresholds mean what they mean for images.

Linking: detections of consecutive sampled frames are matched by the Hungarian method
(``scipy.optimize.linear_sum_assignment``) on an affinity, only within one label: the larger of the
mask IoU with the track's last mask and the box IoU with the track's box carried forward at its last
velocity (so a shape moving farther than its own size between samples is still followed). A track
missing for up to ``max_missed`` sampled frames is kept (Label Studio interpolates across the gap);
past that it ends, and its last keyframe has ``enabled: false`` so the box stops there.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from annotator.labeling import LabelingConfig, parse_labeling_config

LS_DEFAULT_FRAME_RATE = 24.0  # what Label Studio's <Video> assumes without frameRate
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class VideoConfig:
    video: str  # name of the <Video> tag
    video_key: str  # key of the video URL in task data
    frame_rate: float  # the <Video>'s frameRate: Label Studio numbers frames by it
    rectangle: str  # from_name of the <VideoRectangle>
    labels: LabelingConfig  # the same labels as an image config (prompts, thresholds, caption)


def _attr(element: ET.Element, name: str) -> str | None:
    # Label Studio reads tag attributes case-insensitively (toName, toname).
    return next((v for k, v in element.attrib.items() if k.lower() == name.lower()), None)


def is_video_config(xml: str) -> bool:
    try:
        return any(e.tag == "Video" for e in ET.fromstring(xml).iter())
    except ET.ParseError:
        return False


def parse_video_config(xml: str, default_threshold: float = 0.5, thresholds: Mapping[str, float] | None = None,
                       *, mapping: Mapping[str, str] | None = None, override: float | None = None) -> VideoConfig:
    """ValueError (one line) when the config has no <Video>, no <VideoRectangle> or no <Labels> on it."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise ValueError(f"the labeling config cannot be parsed: {err}") from err
    video = next((e for e in root.iter() if e.tag == "Video"), None)
    if video is None or not _attr(video, "name") or not _attr(video, "value"):
        raise ValueError("the labeling config has no <Video name=... value=...> tag")
    name = str(_attr(video, "name"))

    def on_video(e: ET.Element) -> bool:
        return name in [n.strip() for n in (_attr(e, "toName") or "").split(",")]

    rectangle = next((e for e in root.iter() if e.tag == "VideoRectangle" and on_video(e)), None)
    labels = [e for e in root.iter() if e.tag == "Labels" and on_video(e)]
    if rectangle is None or not labels:
        raise ValueError(f"the labeling config needs a <VideoRectangle> and a <Labels> on the video {name!r}")
    image_view = ET.Element("View")
    ET.SubElement(image_view, "Image", name=name, value=str(_attr(video, "value")))
    for control in labels:
        attrs = {k: v for k, v in control.attrib.items() if k.lower() not in ("name", "toname")}
        attrs.update(name=str(_attr(control, "name")), toName=name)
        copy = ET.SubElement(image_view, "RectangleLabels", attrs)
        copy.extend(control)
    caption = next((e for e in root.iter() if e.tag == "TextArea" and on_video(e)
                    and str(_attr(e, "smart")).lower() != "true"), None)
    if caption is not None:
        ET.SubElement(image_view, "TextArea", name=str(_attr(caption, "name")), toName=name)
    config = parse_labeling_config(ET.tostring(image_view, encoding="unicode"), "instance", default_threshold,
                                   thresholds, mapping=mapping, override=override)
    rate = float(_attr(video, "frameRate") or LS_DEFAULT_FRAME_RATE)
    if rate <= 0:
        raise ValueError(f"the <Video> frameRate must be positive, is {rate}")
    return VideoConfig(name, config.image_key, rate, str(_attr(rectangle, "name")), config)


# -- linking -----------------------------------------------------------------------------------------

@dataclass
class Detection:
    label: str  # the control's label value
    box: Box
    score: float
    mask: np.ndarray | None = None  # bool [H, W], the frame's size


@dataclass
class Track:
    label: str
    times: list[float] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    last_mask: np.ndarray | None = None
    missed: int = 0

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0

    def predicted_box(self, t: float) -> Box:
        """The last box moved at the last velocity to time ``t``."""
        box = self.boxes[-1]
        if len(self.boxes) < 2 or self.times[-1] == self.times[-2]:
            return box
        dt = (t - self.times[-1]) / (self.times[-1] - self.times[-2])
        prev = self.boxes[-2]
        return tuple(b + dt * (b - p) for b, p in zip(box, prev, strict=True))  # type: ignore[return-value]


def box_iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return 0.0
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


class Linker:
    """Fed the detections of each sampled frame in time order; ``finish`` gives the tracks. Only the
    open tracks' last masks are held, so memory does not grow with the video's length."""

    def __init__(self, min_affinity: float = 0.2, max_missed: int = 1, min_keyframes: int = 2) -> None:
        self.min_affinity, self.max_missed, self.min_keyframes = min_affinity, max_missed, min_keyframes
        self.open: list[Track] = []
        self.closed: list[Track] = []

    def affinity(self, track: Track, det: Detection, t: float) -> float:
        if track.label != det.label:
            return 0.0
        return max(_mask_iou(track.last_mask, det.mask), box_iou(track.predicted_box(t), det.box))

    def add(self, t: float, detections: Sequence[Detection]) -> None:
        matched: dict[int, int] = {}  # track index -> detection index
        if self.open and detections:
            scores = np.array([[self.affinity(tr, d, t) for d in detections] for tr in self.open])
            rows, cols = linear_sum_assignment(-scores)
            matched = {int(r): int(c) for r, c in zip(rows, cols, strict=True)
                       if scores[r, c] >= self.min_affinity}
        still: list[Track] = []
        for k, track in enumerate(self.open):
            if k in matched:
                self._extend(track, t, detections[matched[k]])
                still.append(track)
            else:
                track.missed += 1
                (still if track.missed <= self.max_missed else self.closed).append(track)
        taken = set(matched.values())
        for j, det in enumerate(detections):
            if j not in taken:
                track = Track(det.label)
                self._extend(track, t, det)
                still.append(track)
        self.open = still

    @staticmethod
    def _extend(track: Track, t: float, det: Detection) -> None:
        track.times.append(t)
        track.boxes.append(det.box)
        track.scores.append(det.score)
        track.last_mask, track.missed = det.mask, 0

    def finish(self) -> list[Track]:
        tracks = self.closed + self.open
        self.open, self.closed = [], []
        for track in tracks:
            track.last_mask = None
        return sorted((t for t in tracks if len(t.times) >= self.min_keyframes), key=lambda t: (t.times[0], t.label))


# -- Label Studio results ------------------------------------------------------------------------------

def ls_frame(t: float, frame_rate: float) -> int:
    """Label Studio's frame number (from 1) of the frame shown at ``t`` seconds."""
    return int(np.floor(t * frame_rate + 0.5)) + 1


def track_result(track: Track, config: VideoConfig, size: tuple[int, int], duration: float,
                 region_id: str) -> dict[str, Any]:
    """A ``videorectangle`` result: one keyframe per sampled frame the track was found in (percent of
    the frame ``size`` = (width, height)); the last keyframe disabled so the box ends there."""
    width, height = size
    sequence: list[dict[str, Any]] = []
    for t, (x0, y0, x1, y1) in zip(track.times, track.boxes, strict=True):
        frame = ls_frame(t, config.frame_rate)
        if sequence and sequence[-1]["frame"] == frame:
            continue  # two samples on one Label Studio frame: the first stands
        sequence.append({"frame": frame, "enabled": True, "rotation": 0, "time": round(t, 4),
                         "x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
                         "width": 100.0 * (x1 - x0) / width, "height": 100.0 * (y1 - y0) / height})
    sequence[-1]["enabled"] = False
    return {"id": region_id, "from_name": config.rectangle, "to_name": config.video, "type": "videorectangle",
            "origin": "prediction", "score": round(track.score, 4),
            "value": {"framesCount": max(1, int(round(duration * config.frame_rate))), "duration": duration,
                      "sequence": sequence, "labels": [track.label]}}


def caption_segments(times: Sequence[float], captions: Sequence[str], end: float) -> list[str]:
    """Runs of one caption over consecutive sampled frames, as 'start–end s: caption' lines."""
    lines: list[str] = []
    k = 0
    while k < len(times):
        j = k
        while j + 1 < len(times) and captions[j + 1] == captions[k]:
            j += 1
        stop = times[j + 1] if j + 1 < len(times) else end
        lines.append(f"{times[k]:.1f}–{stop:.1f} s: {captions[k]}")
        k = j + 1
    return lines


def caption_result(lines: list[str], config: VideoConfig) -> dict[str, Any]:
    assert config.labels.caption is not None
    return {"id": "xdcaption", "from_name": config.labels.caption, "to_name": config.video, "type": "textarea",
            "origin": "prediction", "value": {"text": lines}}

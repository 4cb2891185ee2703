"""Text -> video moments: adjacent matching frames of one video grouped into a time range.

The index finds the frames nearest the query; their videos are the candidates. Each candidate's
stored frames are then scored exactly (the query against their image vectors, from SQL), split into
matching and not by Otsu's threshold on the scores, and a moment is a maximal run of consecutive
matching frames: where the video rises towards the query (the whole video when its frames all
score alike). A moment runs from its first
frame's timestamp to the next stored frame's (the video's end after its last frame), with its best
frame and that frame's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from index.filters import Filters
from index.models import Embedding, Video, VideoFrame
from index.store import from_bytes
from index.videos import frames_of
from xdlabel.search import _text_vector, public_uri
from xdlabel.services import Services


@dataclass(frozen=True)
class Moment:
    start: float
    end: float
    score: float
    best: int  # index of the best frame in the video's frame list
    first: int  # frame indexes the moment spans (inclusive)
    last: int


MIN_CONTRAST = 0.1  # cosine: two groups of frames closer than this in mean score are one


def split_threshold(scores: np.ndarray, min_contrast: float = MIN_CONTRAST) -> float:
    """The score that splits a video's frames into matching and not (Otsu's split of the scores: the
    one with the largest between-group variance); the lowest score, so one moment spans the video,
    when the two groups' means are within ``min_contrast``."""
    ordered = np.sort(scores)
    n = len(ordered)
    if n < 2:
        return float(ordered[0])
    sums = np.cumsum(ordered)
    low_n = np.arange(1, n)
    low_mean = sums[:-1] / low_n
    high_mean = (sums[-1] - sums[:-1]) / (n - low_n)
    between = low_n * (n - low_n) * (high_mean - low_mean) ** 2
    cut = int(np.argmax(between))
    if high_mean[cut] - low_mean[cut] < min_contrast:
        return float(ordered[0])
    return float(ordered[cut + 1])


def group_moments(times: Sequence[float], scores: Sequence[float], duration: float | None,
                  min_contrast: float = MIN_CONTRAST) -> list[Moment]:
    """The moments of one video whose frames (in time order) have ``scores``; best first."""
    if len(times) == 0:
        return []
    s = np.asarray(scores, dtype=np.float64)
    threshold = split_threshold(s, min_contrast)
    moments = []
    k = 0
    while k < len(s):
        if s[k] < threshold:
            k += 1
            continue
        first = k
        while k + 1 < len(s) and s[k + 1] >= threshold:
            k += 1
        top = first + int(np.argmax(s[first:k + 1]))
        end = times[k + 1] if k + 1 < len(times) else max(duration or times[k], times[k])
        moments.append(Moment(float(times[first]), float(end), float(s[top]), top, first, k))
        k += 1
    return sorted(moments, key=lambda m: -m.score)


@dataclass(frozen=True)
class VideoFilters:
    dataset_ids: Sequence[int] = ()
    min_duration: float | None = None  # seconds
    max_duration: float | None = None
    codecs: Sequence[str] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # equality on the video's metadata (list columns)

    def allows(self, video: Video) -> bool:
        duration = video.duration or 0.0
        return ((self.min_duration is None or duration >= self.min_duration)
                and (self.max_duration is None or duration <= self.max_duration)
                and (not self.codecs or video.codec in self.codecs)
                and all(video.meta.get(key) == value for key, value in self.meta.items()))


def search_moments(services: Services, text: str, *, k: int = 10, negative: str | None = None,
                   filters: VideoFilters | None = None, candidates: int = 200,
                   per_video: int = 3) -> list[dict[str, Any]]:
    """The ``k`` best moments for ``text``, at most ``per_video`` from one video, best first."""
    filters = filters or VideoFilters()
    model = services.model
    query = _text_vector(services, text, negative, "image").astype(np.float32)
    hits = services.store.search(model.version_id, "image", query[None], candidates,
                                 filters=Filters(dataset_ids=tuple(filters.dataset_ids)))[0]
    with services.sessions() as session:
        owner: dict[int, int] = dict(session.execute(  # type: ignore[arg-type]
            select(VideoFrame.image_id, VideoFrame.video_id)
            .where(VideoFrame.image_id.in_([h.image_id for h in hits]))).all())
        order = list(dict.fromkeys(owner[h.image_id] for h in hits if h.image_id in owner))
        videos = {v.id: v for v in session.scalars(select(Video).where(Video.id.in_(order)))}
        chosen = [vid for vid in order if vid in videos and filters.allows(videos[vid])][:k]
        frames = frames_of(session, chosen)
        ids = [f.image_id for vid in chosen for f in frames[vid]]
        vectors: dict[int, bytes] = dict(session.execute(  # type: ignore[arg-type]
            select(Embedding.image_id, Embedding.vector).where(
                Embedding.image_id.in_(ids), Embedding.kind == "image",
                Embedding.model_version_id == model.version_id)).all())
    roots = services.settings.source_roots
    out: list[dict[str, Any]] = []
    for vid in chosen:
        video, stored = videos[vid], [f for f in frames[vid] if f.image_id in vectors]
        if not stored:
            continue
        scores = np.stack([from_bytes(vectors[f.image_id]) for f in stored]) @ query
        for m in group_moments([f.timestamp for f in stored], scores.tolist(), video.duration)[:per_video]:
            out.append({"video_id": vid, "dataset_id": video.dataset_id, "uri": public_uri(video.uri, roots),
                        "start": round(m.start, 3), "end": round(m.end, 3), "score": round(m.score, 6),
                        "best_image_id": stored[m.best].image_id, "best_time": round(stored[m.best].timestamp, 3),
                        "frames": m.last - m.first + 1, "duration": video.duration, "meta": video.meta})
    return sorted(out, key=lambda hit: -hit["score"])[:k]

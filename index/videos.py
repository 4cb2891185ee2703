"""Data access for videos and their frames: plain functions over a Session.

A video row is keyed by (dataset, content sha256) like images; one that could not be fetched is
keyed by the hash of its URI until it is (see xdlabel.decoding.uri_key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from index.models import Image, Video, VideoFrame
from index.repository import _insert


def video_states(session: Session, dataset_id: int) -> dict[str, tuple[int, str]]:
    """sha256 -> (video id, status) of a dataset's videos."""
    rows = session.execute(select(Video.sha256, Video.id, Video.status).where(Video.dataset_id == dataset_id))
    return {sha: (vid, status) for sha, vid, status in rows}


def insert_video_if_new(session: Session, *, dataset_id: int, sha256: str, **values: Any) -> tuple[int, str]:
    """(id, status) of the dataset's video of this content, inserted with ``values`` if new; safe
    when another process inserts it at the same moment."""
    session.execute(_insert(session, Video).values(dataset_id=dataset_id, sha256=sha256, **values)
                    .on_conflict_do_nothing(index_elements=[Video.dataset_id, Video.sha256]))
    row = session.execute(select(Video.id, Video.status).where(Video.dataset_id == dataset_id,
                                                               Video.sha256 == sha256)).one()
    return int(row[0]), str(row[1])


def record_fetch_failure(session: Session, *, dataset_id: int, key: str, uri: str, error: str) -> None:
    """A video whose bytes could not be had: one failed row under ``key`` (the URI's hash), whose
    error says the latest reason; it is tried again on every run."""
    vid, _ = insert_video_if_new(session, dataset_id=dataset_id, sha256=key, uri=uri, status="failed", error=error,
                                 frames=0, sampling={}, meta={})
    session.execute(update(Video).where(Video.id == vid).values(error=error))


def forget_fetch_failure(session: Session, *, dataset_id: int, key: str) -> None:
    session.execute(delete(Video).where(Video.dataset_id == dataset_id, Video.sha256 == key,
                                        Video.status == "failed"))


def finish_video(session: Session, video_id: int, error: str | None) -> int:
    """Marks a video done (or failed with ``error``) with the count of its stored frames; returns it."""
    frames = int(session.scalar(select(func.count()).select_from(VideoFrame)
                                .where(VideoFrame.video_id == video_id)) or 0)
    session.execute(update(Video).where(Video.id == video_id)
                    .values(status="failed" if error else "done", error=error, frames=frames))
    return frames


@dataclass(frozen=True)
class StoredFrame:
    image_id: int
    timestamp: float


def frames_of(session: Session, video_ids: Sequence[int]) -> dict[int, list[StoredFrame]]:
    """The stored (done) frames of each video, in time order."""
    rows = session.execute(select(VideoFrame.video_id, VideoFrame.image_id, VideoFrame.timestamp)
                           .join(Image, Image.id == VideoFrame.image_id)
                           .where(VideoFrame.video_id.in_(list(video_ids)), Image.status == "done")
                           .order_by(VideoFrame.video_id, VideoFrame.timestamp))
    out: dict[int, list[StoredFrame]] = {v: [] for v in video_ids}
    for vid, image_id, t in rows:
        out[vid].append(StoredFrame(image_id, float(t)))
    return out

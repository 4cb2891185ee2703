"""Video ingestion: each video's sampled frames go through the image pipeline's model pass and writer.

Per video: read it (a local file is hashed while streamed and decoded from the same open file; a
URL comes through the guarded fetcher under the byte cap), skip it when the dataset holds its
content already, record a row for it, then decode and sample frames in a thread while the model
runs on the previous batch (batches never mix videos: a video's frames share a size). Each frame
is an image row keyed by (video hash, frame timestamp), linked to its video in ``video_frames``,
written with its vectors in the batch's transaction. A video is marked done (or failed, with the
reason) by the writer after its last batch, so a run killed mid-video leaves it pending with whole
batches of frames, and the rerun decodes it again and skips every frame already stored.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from index.models import VideoFrame
from index.retry import retry
from index.videos import (
    finish_video,
    forget_fetch_failure,
    insert_video_if_new,
    record_fetch_failure,
    video_states,
)
from xdecoder.predictor import Predictor
from xdlabel.decoding import Decoded, is_transient_fetch, reason, uri_key
from xdlabel.inference import InferredBatch, infer_each
from xdlabel.ingest import IngestPipeline, IngestReport
from xdlabel.services import Services
from xdlabel.sources import Access, FetchError, Item, fetch, open_checked
from xdlabel.video import Frame, Sampling, VideoError, VideoLimits, frame_key, is_video_uri, open_video, sample_frames

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass
class FrameDecoded(Decoded):
    """A sampled frame on its way to the model and the writer."""

    video_id: int = 0
    timestamp: float = 0.0
    pts: int = 0


@dataclass
class VideoFinished(InferredBatch):
    """Sent to the writer after a video's last batch: marks the video done or failed."""

    video_id: int = 0
    uri: str = ""
    error: str | None = None


@dataclass
class _End:
    error: str | None = None


class VideoPipeline(IngestPipeline):
    def __init__(self, services: Services, dataset: str, *, sampling: Sampling | None = None,
                 **options: Any) -> None:
        super().__init__(services, dataset, **options)
        self.sampling = sampling or Sampling(fps=1.0)
        settings = services.settings
        self.limits = VideoLimits(settings.max_image_pixels, settings.max_video_seconds, settings.max_video_frames)

    def run(self, items: Iterable[Item]) -> IngestReport:
        known = self.prepare()
        predictor = self.services.predictor
        writes: queue.Queue[InferredBatch | None] = queue.Queue(maxsize=2)
        writer_error: list[BaseException] = []
        writer = threading.Thread(target=self._write_loop, args=(writes, writer_error), name="video-writer",
                                  daemon=True)
        writer.start()
        try:
            for item in items:
                if writer_error:
                    break
                if self.should_stop and self.should_stop():
                    self.report.cancelled = True
                    break
                if not self._video(item, known, predictor, writes, writer):
                    break
        finally:
            self._put(writes, None, writer)
            writer.join()
        if writer_error:
            raise writer_error[0]
        return self.report

    # -- reading ----------------------------------------------------------------------------------

    def _open(self, item: Item) -> tuple[IO[bytes], str, int]:
        """(a seekable file of the video, its sha256, its size); FetchError when it cannot be had."""
        settings = self.services.settings
        cap = settings.max_video_bytes
        parsed = urlparse(item.uri)
        if parsed.scheme in ("file", ""):
            path = Path(unquote(parsed.path))
            f = open_checked(str(path), path, Access.of(self.source_roots, self.forbidden))
            try:
                size = os.fstat(f.fileno()).st_size
                if size > cap:
                    raise FetchError(f"video of {size} bytes is over the {cap}-byte limit")
                digest = hashlib.sha256()
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                f.seek(0)
            except BaseException:
                f.close()
                raise
            return f, digest.hexdigest(), size
        data = fetch(item.uri, max_bytes=cap, timeout=self.fetch_timeout, allow_private=settings.allow_private_urls)
        return io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data)

    def _video(self, item: Item, known: set[str], predictor: Predictor,
               writes: queue.Queue[InferredBatch | None], writer: threading.Thread) -> bool:
        """One video; False when the run must stop (the writer is gone, or a stop was asked)."""
        try:
            source, sha, size = retry(lambda: self._open(item), transient=is_transient_fetch, attempts=3,
                                      first_wait=0.2, max_wait=2.0, what=item.uri)
        except Exception as err:  # noqa: BLE001 - whatever it is, it is this video's failure
            why = reason(err)
            self._db(lambda s: record_fetch_failure(s, dataset_id=self.dataset_id, key=uri_key(item.uri),
                                                    uri=item.uri, error=why))
            self.report.failed[item.uri] = why
            return True
        with source:
            state = self._db(lambda s: video_states(s, self.dataset_id).get(sha))
            if state is not None and state[1] != "pending":  # done, or these bytes failed before
                self.report.duplicates.append(item.uri)
                return True
            try:
                container, stream, info = open_video(source, self.limits)
            except VideoError as err:
                why = str(err)
                self._db(lambda s: self._record(s, item, sha, size, status="failed", error=why))
                self.report.failed[item.uri] = why
                return True
            with closing(container):
                video_id = self._db(lambda s: self._record(
                    s, item, sha, size, status="pending", width=info.width, height=info.height,
                    duration=info.duration, fps=info.fps, codec=info.codec[:32]))
                frames = self._decode_ahead(sample_frames(container, stream, info, self.sampling, self.limits))
                return self._frames(item, sha, video_id, frames, known, predictor, writes, writer)

    def _record(self, session: Session, item: Item, sha: str, size: int, **values: Any) -> int:
        vid, _ = insert_video_if_new(session, dataset_id=self.dataset_id, sha256=sha, uri=item.uri, size_bytes=size,
                                     frames=0, sampling=self.sampling.as_dict(), meta=dict(item.meta), **values)
        forget_fetch_failure(session, dataset_id=self.dataset_id, key=uri_key(item.uri))
        return vid

    def _db(self, work: Any) -> Any:
        def once() -> Any:
            with self.services.sessions() as session:
                out = work(session)
                session.commit()
                return out

        return retry(once, what=f"video rows of {self.dataset!r}")

    def _decode_ahead(self, frames: Iterator[Frame]) -> Iterator[Frame | _End]:
        """``frames`` decoded in a thread, a few batches ahead of the model (FFmpeg and the
        colour conversion release the GIL); ends with an ``_End`` that carries a decoding error."""
        ahead: queue.Queue[Frame | _End] = queue.Queue(maxsize=2 * self.batch_size)
        stop = threading.Event()

        def put(value: Frame | _End) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(value, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for frame in frames:
                    if not put(frame):
                        return
                put(_End())
            except VideoError as err:
                put(_End(str(err)))
            except Exception as err:  # noqa: BLE001 - reported as the video's failure
                put(_End(reason(err)))

        thread = threading.Thread(target=work, name="video-decode", daemon=True)
        thread.start()
        try:
            while True:
                value = ahead.get()
                yield value
                if isinstance(value, _End):
                    return
        finally:
            stop.set()
            thread.join()

    def _frames(self, item: Item, sha: str, video_id: int, frames: Iterator[Frame | _End], known: set[str],
                predictor: Predictor, writes: queue.Queue[InferredBatch | None], writer: threading.Thread) -> bool:
        batch: list[Decoded] = []
        error: str | None = None
        for frame in frames:
            if isinstance(frame, _End):
                error = frame.error
                break
            key = frame_key(sha, frame.pts)
            uri = f"{item.uri}#t={frame.timestamp:.3f}"
            if key in known or key in self.stored:
                self.report.duplicates.append(uri)
                continue
            batch.append(FrameDecoded(Item(uri, dict(item.meta)), key, frame.rgb, "RGB", fetched=True,
                                      video_id=video_id, timestamp=frame.timestamp, pts=frame.pts))
            if len(batch) == self.batch_size:
                if not self._put(writes, infer_each(predictor, batch, [], outputs=self.outputs), writer):
                    return False
                batch = []
                if self.should_stop and self.should_stop():
                    self.report.cancelled = True
                    return False  # the video stays pending: the next run resumes it
        if batch and not self._put(writes, infer_each(predictor, batch, [], outputs=self.outputs), writer):
            return False
        return self._put(writes, VideoFinished([], [], video_id=video_id, uri=item.uri, error=error), writer)

    # -- writing ----------------------------------------------------------------------------------

    def write(self, batch: InferredBatch) -> None:
        if not isinstance(batch, VideoFinished):
            super().write(batch)
            return
        if batch.error:  # a failed video keeps no frames, as a bad image keeps no row but its failure
            with self.services.sessions() as session:
                doomed = list(session.scalars(select(VideoFrame.image_id).where(VideoFrame.video_id == batch.video_id)))
                self.services.store.remove_images(session, doomed)
            with self._lock:
                self.report.failed[batch.uri] = batch.error
                gone = set(doomed)
                self.report.added = [i for i in self.report.added if i not in gone]
        self._db(lambda s: finish_video(s, batch.video_id, batch.error))
        if self.progress:
            self.progress(self.report)

    def _inserted(self, session: Session, decoded: Decoded, image_id: int) -> None:
        if isinstance(decoded, FrameDecoded):
            session.add(VideoFrame(image_id=image_id, video_id=decoded.video_id, timestamp=decoded.timestamp,
                                   pts=decoded.pts))


def split_videos(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """(images, videos) by the file name's suffix."""
    images = [i for i in items if not is_video_uri(i.uri)]
    return images, [i for i in items if is_video_uri(i.uri)]


def merge_reports(first: IngestReport, second: IngestReport) -> IngestReport:
    first.added += second.added
    first.duplicates += second.duplicates
    first.failed.update(second.failed)
    first.cancelled = first.cancelled or second.cancelled
    first.delivery = first.delivery or second.delivery
    return first

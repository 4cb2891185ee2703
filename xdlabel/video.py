"""Videos to sampled frames: probing, limits and sampling policies, on PyAV (FFmpeg in its wheel).

Nothing here knows of storage or the model. ``sample_frames`` decodes a video stream once and
yields the frames a ``Sampling`` keeps, with their timestamps; every failure is a ``VideoError``
whose message says why in one line (not a video, no video stream, over a limit, truncated).

Scene-change sampling compares each candidate frame with the last kept one by the mean absolute
difference of 16x16 colour thumbnails (0..1): a cheap stand-in for the model's embedding that
costs a resize per candidate, so static stretches cost neither the model nor storage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import IO, Any

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts"}
THUMB = 16  # scene-change thumbnails are THUMB x THUMB


class VideoError(ValueError):
    """A video that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True)
class Sampling:
    """Which decoded frames become image rows.

    Candidates are one frame per ``1/fps`` seconds (the first at or past each tick), or every
    ``every_n``-th decoded frame, or every frame when neither is set. With ``scene`` a candidate is
    kept only when its thumbnail differs from the last kept frame's by more than ``scene`` (0..1),
    or ``max_gap`` seconds have passed since it; the first frame is always kept."""

    fps: float | None = None
    every_n: int | None = None
    scene: float | None = None
    max_gap: float = 10.0

    def __post_init__(self) -> None:
        if self.fps is not None and self.every_n is not None:
            raise ValueError("choose one of --fps and --every-n")
        if self.fps is not None and not 0 < self.fps <= 1000:
            raise ValueError(f"fps must be in (0, 1000], is {self.fps}")
        if self.every_n is not None and self.every_n < 1:
            raise ValueError(f"every-n must be at least 1, is {self.every_n}")
        if self.scene is not None and not 0 <= self.scene < 1:
            raise ValueError(f"the scene-change threshold must be in [0, 1), is {self.scene}")
        if self.max_gap <= 0:
            raise ValueError(f"max_gap must be positive, is {self.max_gap}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class VideoLimits:
    max_pixels: int = 64_000_000  # per frame
    max_seconds: float = 4 * 3600.0  # declared duration
    max_frames: int = 20_000  # sampled frames per video


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    duration: float | None  # seconds, as the container declares it
    fps: float | None
    codec: str


@dataclass
class Frame:
    pts: int  # presentation timestamp in the stream's time base (unique within the stream)
    timestamp: float  # seconds from the start
    rgb: np.ndarray  # [H, W, 3] uint8


def frame_key(video_sha256: str, pts: int) -> str:
    """A frame's content key: its video's hash and its place in it (two identical frames at two
    times are two rows; the same frame sampled again on a resumed run is the same row)."""
    return hashlib.sha256(f"{video_sha256}:frame:{pts}".encode()).hexdigest()


def is_video_uri(uri: str) -> bool:
    from pathlib import PurePosixPath
    from urllib.parse import unquote, urlparse

    return PurePosixPath(unquote(urlparse(uri).path)).suffix.lower() in VIDEO_SUFFIXES


def _av_reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:300]


def probe(container: Any, limits: VideoLimits) -> tuple[Any, VideoInfo]:
    """The first video stream and what it declares, or VideoError when it is over a limit."""
    if not container.streams.video:
        raise VideoError("not a video: no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width <= 0 or height <= 0:
        raise VideoError("not a video: the stream declares no frame size")
    if width * height > limits.max_pixels:
        raise VideoError(f"frames of {width}x{height} are over the {limits.max_pixels}-pixel limit")
    duration: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    if duration is not None and duration > limits.max_seconds:
        raise VideoError(f"video of {duration:.0f} s is over the {limits.max_seconds:.0f}-second limit")
    rate = stream.average_rate or stream.guessed_rate
    return stream, VideoInfo(width, height, duration, float(rate) if rate else None, str(ctx.name))


def expected_frames(info: VideoInfo, sampling: Sampling) -> float | None:
    """How many frames ``sampling`` keeps of a video, from what it declares (None: unknown); scene
    sampling keeps at most this many."""
    if info.duration is None:
        return None
    if sampling.fps is not None:
        return info.duration * sampling.fps
    if info.fps is None:
        return None
    return info.duration * info.fps / (sampling.every_n or 1)


def open_video(source: IO[bytes], limits: VideoLimits) -> tuple[Any, Any, VideoInfo]:
    """(container, stream, info) of a seekable binary file; VideoError when it is not a video."""
    import av

    try:
        container = av.open(source, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError(f"not a readable video ({_av_reason(err)})") from None
    try:
        stream, info = probe(container, limits)
    except BaseException:
        container.close()
        raise
    return container, stream, info


def _thumb(frame: Any) -> np.ndarray:
    small = frame.reformat(width=THUMB, height=THUMB, format="rgb24").to_ndarray()
    return np.asarray(small, dtype=np.float32) / 255.0


def sample_frames(container: Any, stream: Any, info: VideoInfo, sampling: Sampling,
                  limits: VideoLimits) -> Iterator[Frame]:
    """The frames ``sampling`` keeps, in order. Raises VideoError when decoding fails, when more
    than ``limits.max_frames`` would be kept, or when the stream ends well before its declared
    duration (a truncated file)."""
    import av

    expected = expected_frames(info, sampling)
    if expected is not None and sampling.scene is None and expected > limits.max_frames + 1:
        raise VideoError(f"{expected:.0f} frames would be sampled, more than {limits.max_frames}; sample fewer "
                         "(--fps, --every-n, --scene) or raise XDLABEL_MAX_VIDEO_FRAMES")
    stream.thread_type = "AUTO"  # FFmpeg's own frame threads; they release the GIL
    time_base: Fraction = stream.time_base or Fraction(1, 1000)
    next_tick = 0.0
    last_kept: tuple[float, np.ndarray] | None = None
    kept = decoded = 0
    last_time = 0.0
    step = 1 / info.fps if info.fps else 0.0
    try:
        for frame in container.decode(stream):
            decoded += 1
            if frame.pts is None:
                continue  # a frame with no timestamp cannot be placed on the timeline
            t = float(frame.pts * time_base)
            last_time = t
            if sampling.fps is not None:
                if t + 1e-6 < next_tick:
                    continue
                next_tick = float(np.floor(t * sampling.fps + 1e-6) + 1) / sampling.fps  # the next tick past t
            elif sampling.every_n is not None and (decoded - 1) % sampling.every_n:
                continue
            if sampling.scene is not None:
                thumb = _thumb(frame)
                if last_kept is not None and t - last_kept[0] < sampling.max_gap and \
                        float(np.abs(thumb - last_kept[1]).mean()) <= sampling.scene:
                    continue
                last_kept = (t, thumb)
            kept += 1
            if kept > limits.max_frames:
                raise VideoError(f"more than {limits.max_frames} frames would be sampled; sample fewer "
                                 "(--fps, --every-n, --scene) or raise XDLABEL_MAX_VIDEO_FRAMES")
            yield Frame(int(frame.pts), t, frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as err:
        raise VideoError(f"decoding failed at {last_time:.2f} s ({_av_reason(err)})") from None
    if decoded == 0:
        raise VideoError("not a readable video: no frame could be decoded")
    if info.duration is not None and last_time + step + max(0.5, 2 * step) < info.duration:
        raise VideoError(f"truncated: frames end at {last_time:.2f} s of the declared {info.duration:.2f} s")

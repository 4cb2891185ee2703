"""Test videos made with PyAV: coloured shapes moving over textured backgrounds (the synthetic scenes
the bundled model was trained on), with the ground truth of where each shape is at each frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from xdecoder.training.synthetic import COLORS, STUFF_COLORS, _shape_mask, _texture

FORMATS = {".mp4": ("mp4", "libx264"), ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"),
           ".mov": ("mov", "mpeg4")}


@dataclass(frozen=True)
class Actor:
    """A shape on screen from ``start`` to ``end`` seconds, moving from ``a`` to ``b`` (centres, pixels)."""

    kind: str  # circle | square | triangle
    color: str
    start: float
    end: float
    a: tuple[float, float]
    b: tuple[float, float]
    radius: float

    def centre(self, t: float) -> tuple[float, float]:
        u = 0.0 if self.end <= self.start else min(max((t - self.start) / (self.end - self.start), 0.0), 1.0)
        return self.a[0] + u * (self.b[0] - self.a[0]), self.a[1] + u * (self.b[1] - self.a[1])

    def visible(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Clip:
    path: Path
    fps: int
    seconds: float
    size: tuple[int, int]  # (width, height)
    actors: list[Actor] = field(default_factory=list)

    def mask(self, actor: Actor, t: float) -> np.ndarray:
        cx, cy = actor.centre(t)
        return _shape_mask(actor.kind, cx, cy, actor.radius, self.size)

    def box(self, actor: Actor, t: float) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask(actor, t))
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def render(clip: Clip, ground: str = "grass", seed: int = 0) -> Clip:
    """Writes ``clip`` (its container and codec from the file's suffix) and returns it."""
    rng = np.random.default_rng(seed)
    w, h = clip.size
    horizon = h // 2
    background = np.empty((h, w, 3), dtype=np.float32)
    background[:horizon] = _texture(rng, horizon, w, STUFF_COLORS["sky"])
    background[horizon:] = _texture(rng, h - horizon, w, STUFF_COLORS[ground])
    fmt, codec = FORMATS[clip.path.suffix]
    clip.path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(clip.path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=clip.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for n in range(int(round(clip.seconds * clip.fps))):
            t = n / clip.fps
            pixels = background.copy()
            for actor in clip.actors:
                if actor.visible(t):
                    pixels[clip.mask(actor, t)] = COLORS[actor.color]
            frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return clip


def red_circle_clip(path: Path, *, fps: int = 10, seconds: float = 8.0, appear: float = 3.0,
                    leave: float = 6.0, size: tuple[int, int] = (160, 128)) -> Clip:
    """A blue square crossing the whole clip; a large red circle moving left to right from
    ``appear`` to ``leave`` seconds."""
    w, h = size
    r = 0.22 * min(w, h)
    return render(Clip(path, fps, seconds, size, [
        Actor("square", "blue", 0.0, seconds, (w * 0.2, h * 0.75), (w * 0.8, h * 0.75), 0.14 * min(w, h)),
        Actor("circle", "red", appear, leave, (r + 4, h * 0.4), (w - r - 4, h * 0.4), r),
    ]))


def still_clip(path: Path, kind: str, color: str, *, fps: int = 10, seconds: float = 6.0,
               ground: str = "sand", size: tuple[int, int] = (160, 128)) -> Clip:
    """One shape slowly moving over ``ground`` for the whole clip."""
    w, h = size
    r = 0.2 * min(w, h)
    return render(Clip(path, fps, seconds, size, [
        Actor(kind, color, 0.0, seconds, (w * 0.35, h * 0.5), (w * 0.65, h * 0.5), r)]), ground=ground, seed=1)

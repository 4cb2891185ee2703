"""A seeded generator of synthetic scenes with full ground truth, for training and evaluation.

Each scene: a background of stuff regions (sky over grass, sand or water, with texture), and
1-4 things (circle, square, triangle) in several colours and sizes, drawn in depth order so
later shapes occlude earlier ones. Ground truth: a panoptic segment map with segment infos,
one referring phrase per visible thing ("the small green triangle left of the red circle") and a
caption ("a red circle and two blue squares on grass"). Same seed, same scenes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

THINGS = ("circle", "square", "triangle")
STUFF = ("sky", "grass", "sand", "water")
CLASSES = THINGS + STUFF  # category ids index this tuple
COLORS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 30)}
STUFF_COLORS = {"sky": (140, 190, 235), "grass": (80, 150, 60), "sand": (215, 190, 130), "water": (50, 110, 160)}
SIZES = {"small": (0.08, 0.13), "large": (0.16, 0.24)}  # radius as a fraction of the image's short side
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Segment:
    id: int  # value in the segment map
    category_id: int  # index into CLASSES
    isthing: bool
    color: str | None = None
    size: str | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive)
    area: int = 0


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    segment_map: np.ndarray  # [H, W] int32, 0 = void
    segments: list[Segment]
    phrases: dict[int, str] = field(default_factory=dict)  # segment id -> referring phrase
    caption: str = ""

    def mask(self, segment_id: int) -> np.ndarray:
        return self.segment_map == segment_id


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(rng: np.random.Generator, h: int, w: int, color: tuple[int, int, int]) -> np.ndarray:
    noise = rng.normal(0, 10, (h, w, 1))
    stripes = 8 * np.sin(np.arange(w)[None, :, None] / rng.uniform(3, 9)) if rng.random() < 0.4 else 0
    return np.clip(np.array(color, dtype=np.float32) + noise + stripes, 0, 255)


def _relation(a: Segment, b: Segment) -> str:
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def _describe(seg: Segment) -> str:
    return f"{seg.size} {seg.color} {CLASSES[seg.category_id]}"


def make_scene(seed: int, size: tuple[int, int] = (160, 128), min_area: int = 40) -> Scene:
    """One scene, a pure function of ``seed``. ``size`` is (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    horizon = int(h * rng.uniform(0.35, 0.6))
    ground = STUFF[1 + int(rng.integers(3))]
    pixels = np.empty((h, w, 3), dtype=np.float32)
    pixels[:horizon] = _texture(rng, horizon, w, STUFF_COLORS["sky"])
    pixels[horizon:] = _texture(rng, h - horizon, w, STUFF_COLORS[ground])
    owner = np.zeros((h, w), dtype=np.int32)  # 1 = sky, 2 = ground, 3.. = things in drawing order
    owner[:horizon], owner[horizon:] = 1, 2
    things = []
    for k in range(int(rng.integers(1, 5))):
        kind = THINGS[int(rng.integers(len(THINGS)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size_name = "small" if rng.random() < 0.5 else "large"
        r = rng.uniform(*SIZES[size_name]) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        mask = _shape_mask(kind, cx, cy, r, (w, h))
        shade = np.array(COLORS[color], dtype=np.float32) * rng.uniform(0.85, 1.1)
        pixels[mask] = np.clip(shade + rng.normal(0, 6, (int(mask.sum()), 3)), 0, 255)
        owner[mask] = 3 + k
        things.append((kind, color, size_name))
    segment_map = np.zeros((h, w), dtype=np.int32)
    segments: list[Segment] = []
    for value in np.unique(owner):
        region = owner == value
        area = int(region.sum())
        if value >= 3 and area < min_area:
            continue  # hidden behind later shapes: not a segment
        ys, xs = np.nonzero(region)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        seg_id = len(segments) + 1
        if value < 3:
            name = "sky" if value == 1 else ground
            segments.append(Segment(seg_id, CLASSES.index(name), False, box=box, area=area))
        else:
            kind, color, size_name = things[value - 3]
            segments.append(Segment(seg_id, CLASSES.index(kind), True, color, size_name, box, area))
        segment_map[region] = seg_id
    scene = Scene(pixels.astype(np.uint8), segment_map, segments)
    visible = [s for s in segments if s.isthing]
    for seg in visible:
        others = [o for o in visible if o.id != seg.id]
        phrase = f"the {_describe(seg)}"
        if others:
            other = others[int(rng.integers(len(others)))]
            phrase += f" {_relation(seg, other)} the {other.color} {CLASSES[other.category_id]}"
        scene.phrases[seg.id] = phrase
    scene.caption = caption_of(_groups(visible), ground)
    return scene


def _groups(things: list[Segment]) -> dict[tuple[str, str], int]:
    groups: dict[tuple[str, str], int] = {}
    for seg in things:
        key = (seg.color or "", CLASSES[seg.category_id])
        groups[key] = groups.get(key, 0) + 1
    return groups


def caption_of(groups: dict[tuple[str, str], int], ground: str) -> str:
    """'a red circle and two blue squares on grass' from {(colour, kind): count} and the ground."""
    parts = [f"{NUMBERS[n]} {color} {kind}{'s' if n > 1 else ''}" for (color, kind), n in sorted(groups.items())]
    things_text = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts) if parts else "nothing"
    return f"{things_text} on {ground}"


def near_misses(scene: Scene, count: int, rng: random.Random) -> list[str]:
    """Up to ``count`` captions that are wrong for ``scene`` in one respect: one group's colour, shape or
    count, or the ground. Contrastive training with them as negatives teaches the embedding those details,
    which is what separates scenes in retrieval."""
    groups = _groups([s for s in scene.segments if s.isthing])
    grounds = [CLASSES[s.category_id] for s in scene.segments if not s.isthing and CLASSES[s.category_id] != "sky"]
    ground = grounds[0] if grounds else scene.caption.rsplit(" on ", 1)[-1]
    edits: list[tuple[dict[tuple[str, str], int], str]] = [(groups, g) for g in STUFF[1:] if g != ground]
    for (color, kind), n in groups.items():
        rest = {key: m for key, m in groups.items() if key != (color, kind)}
        swaps = [(c, kind) for c in COLORS if c != color] + [(color, k) for k in THINGS if k != kind]
        for key in swaps:
            edits.append(({**rest, key: rest.get(key, 0) + n}, ground))
        for m in (n - 1, n + 1):
            if 1 <= m <= 4 or (m == 0 and rest):
                edits.append(({**rest, (color, kind): m} if m else rest, ground))
    captions = sorted({caption_of(g, gr) for g, gr in edits if max(g.values(), default=1) <= 4} - {scene.caption})
    return rng.sample(captions, min(count, len(captions)))


def make_scenes(count: int, seed: int = 0, size: tuple[int, int] = (160, 128)) -> list[Scene]:
    """``count`` scenes; scene i depends only on (seed, i)."""
    return [make_scene(seed * 1_000_003 + i, size) for i in range(count)]

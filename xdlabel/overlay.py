"""Pictures a reader can check by eye: segment overlays (outline, label and score per segment, legend) and
contact sheets of search hits (thumbnail, rank, score, caption). One function each, shared by the demo,
``xdlabel prelabel --preview`` and the API's overlay PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

MIN_SHORT_SIDE = 384  # small images are scaled up (nearest) so that labels stay readable
LEGEND_WIDTH = 220
# Distinct colours (Okabe-Ito, then Tableau) for segments in legend order.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (148, 103, 189), (140, 86, 75), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass(frozen=True)
class LabeledMask:
    mask: np.ndarray  # [H, W] bool, in the image's own pixels
    label: str
    score: float


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _scale_for(width: int, height: int) -> int:
    return max(1, -(-MIN_SHORT_SIDE // min(width, height)))  # ceil: never smaller than the image


def overlay(image: Image.Image, segments: Sequence[LabeledMask], title: str = "") -> Image.Image:
    """The image (scaled up to a short side of at least MIN_SHORT_SIDE) with each segment tinted, outlined,
    and tagged with its label and score at its top-left; a legend on the right lists them all."""
    rgb = image.convert("RGB")
    scale = _scale_for(*rgb.size)
    w, h = rgb.width * scale, rgb.height * scale
    pixels = np.asarray(rgb.resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)
    big_masks = [np.kron(s.mask.astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool) for s in segments]
    for i, mask in enumerate(big_masks):
        color = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        pixels[mask] = 0.6 * pixels[mask] + 0.4 * color
        # Padded, so that a segment cut by the image border is closed there too.
        edge = find_boundaries(np.pad(mask, 1), mode="inner")[1:-1, 1:-1]
        edge |= np.roll(edge, 1, axis=0) & mask | np.roll(edge, 1, axis=1) & mask  # 2 px outlines
        pixels[edge] = color
    canvas = Image.new("RGB", (w + LEGEND_WIDTH, max(h, 40 + 22 * len(segments))), (255, 255, 255))
    canvas.paste(Image.fromarray(pixels.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(13)
    for i, (seg, mask) in enumerate(zip(segments, big_masks, strict=True)):
        ys, xs = np.nonzero(mask)
        if not len(xs):
            continue
        tag = f"{i + 1} {seg.label} {seg.score:.2f}"
        x, y = int(xs.min()), int(ys.min())
        box = draw.textbbox((x + 2, y + 2), tag, font=small)
        draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 2, y + 2), tag, fill=(0, 0, 0), font=small)
    draw.text((w + 10, 8), title or f"{len(segments)} segments", fill=(0, 0, 0), font=font)
    for i, seg in enumerate(segments):
        y = 34 + 22 * i
        draw.rectangle((w + 10, y, w + 26, y + 16), fill=PALETTE[i % len(PALETTE)], outline=(0, 0, 0))
        draw.text((w + 32, y), f"{i + 1} {seg.label}  {seg.score:.2f}", fill=(0, 0, 0), font=small)
    return canvas


def prediction_overlay(image: Image.Image, results: Sequence[dict[str, Any]], title: str = "") -> Image.Image:
    """A Label Studio prediction's mask, polygon and box results drawn on its image (``prelabel --preview``)."""
    from annotator.convert import result_label, result_to_mask

    segments = []
    for result in results:
        mask = result_to_mask(result)
        if mask is not None and mask.shape == (image.height, image.width):
            label = f"{result['from_name']}:{result_label(result)}"
            segments.append(LabeledMask(mask, label, float(result.get("score") or 0.0)))
    return overlay(image, segments, title)


@dataclass(frozen=True)
class Hit:
    image: Image.Image
    name: str
    score: float
    caption: str


def contact_sheet(query: str, hits: Sequence[Hit], cell: int = 256) -> Image.Image:
    """One row per query: the query, then each hit's image with its rank, score, name and caption."""
    font, small = _font(16), _font(13)
    pad, text_h = 8, 44
    thumbs = [h.image.convert("RGB") for h in hits]
    thumbs = [t.resize((cell, max(1, round(cell * t.height / t.width))), Image.Resampling.NEAREST) for t in thumbs]
    row = max((t.height for t in thumbs), default=0)
    sheet = Image.new("RGB", (max(pad + len(hits) * (cell + pad), 400), 30 + row + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), f"query: {query!r}", fill=(0, 0, 0), font=font)
    for i, (hit, thumb) in enumerate(zip(hits, thumbs, strict=True)):
        x = pad + i * (cell + pad)
        sheet.paste(thumb, (x, 30))
        draw.text((x, 34 + row), f"#{i + 1}  score {hit.score:+.3f}  {hit.name}", fill=(0, 0, 0), font=small)
        draw.text((x, 52 + row), hit.caption[:42], fill=(60, 60, 60), font=small)
    return sheet

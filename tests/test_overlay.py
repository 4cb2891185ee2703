"""The overlay picture: every segment outlined in its legend colour, tagged, listed; never below image size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xdlabel.overlay import LEGEND_WIDTH, MIN_SHORT_SIDE, PALETTE, Hit, LabeledMask, contact_sheet, overlay


def _legend_has_swatch(picture: Image.Image, width: int, row: int, color: tuple[int, int, int]) -> bool:
    y = 34 + 22 * row + 8
    return tuple(np.asarray(picture)[y, width + 18]) == color


def test_random_segments_are_outlined_tagged_and_listed() -> None:
    """40 seeded trials: random rectangles and discs on random images of random sizes."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        yy, xx = np.mgrid[:h, :w]
        segments = []
        for i in range(int(rng.integers(1, 6))):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 30)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
            segments.append(LabeledMask(mask, f"class{i}", float(rng.random())))
        picture = overlay(image, segments)
        scale = max(1, -(-MIN_SHORT_SIDE // min(w, h)))
        assert picture.width == w * scale + LEGEND_WIDTH and picture.height >= h * scale >= min(w, h)
        pixels = np.asarray(picture)
        for i, seg in enumerate(segments):
            color = PALETTE[i % len(PALETTE)]
            assert _legend_has_swatch(picture, w * scale, i, color)
            # The mask's outermost pixels carry the segment's colour unless a later segment covers them.
            later = np.zeros_like(seg.mask)
            for other in segments[i + 1:]:
                later |= other.mask
            ys, xs = np.nonzero(seg.mask)
            bottom = [x for y, x in zip(ys, xs, strict=True) if y == ys.max() and not later[y, x]]
            if bottom:  # the mask's bottom row is on its boundary (tags sit at the top)
                y, x = ys.max() * scale + scale - 1, bottom[0] * scale
                covered_by_tag = any(tuple(pixels[y, x]) == PALETTE[j % len(PALETTE)] for j in range(len(segments)))
                assert covered_by_tag, (i, y, x, pixels[y, x])


def test_contact_sheet_shows_each_hit_at_least_at_cell_width() -> None:
    rng = np.random.default_rng(3)
    hits = [Hit(Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)), f"h{i}.png", 0.5 - i / 10,
                "a caption") for i in range(3)]
    sheet = contact_sheet("a red circle", hits, cell=200)
    assert sheet.width >= 3 * 200 and sheet.height >= round(200 * 64 / 96) + 30
    # The first hit's pixels are pasted (scaled up, nearest) under the title.
    first = np.asarray(hits[0].image.resize((200, 133), Image.Resampling.NEAREST))
    assert np.array_equal(np.asarray(sheet)[30:30 + 133, 8:208], first)

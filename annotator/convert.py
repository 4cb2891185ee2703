"""Masks to and from Label Studio results and COCO RLE. Pure functions, no I/O.

Label Studio geometry is in percent (0-100) of the image, with the pixel (col, row) covering
[col, col + 1] x [row, row + 1]; brush masks use Label Studio's own RLE codec (label-studio-sdk) on
uint8 0/255 masks, so a round trip is exact. Polygons trace the mask's outline halfway between
pixel centres (marching squares), so an unsimplified outline rasterizes back to the very same
pixels; `tolerance` (pixels) then bounds how far a simplified outline strays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from skimage import draw, measure

Result = dict[str, Any]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask must be a non-empty 2-D array, got shape {mask.shape}")
    return mask.astype(bool)


# -- brush RLE ---------------------------------------------------------------------------------------

def _brush() -> ModuleType:
    # Imported on first use: the SDK's converter package costs ~2.5 s to import, and most processes
    # that import this module (ingest workers, the command line) never draw a brush.
    from label_studio_sdk.converter import brush
    return brush


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    return [int(v) for v in _brush().mask2rle(_check_mask(mask).astype(np.uint8) * 255)]


def brush_rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    flat = np.asarray(_brush().decode_rle(rle), dtype=np.uint8)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size // 4} pixels, the image has {height}x{width}")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


# -- polygons ----------------------------------------------------------------------------------------

@dataclass
class Outline:
    """One connected part: its outer ring and its holes, as (x, y) points in pixel units."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    def rings(self) -> list[np.ndarray]:
        return [self.exterior, *self.holes]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker; a ring that would collapse below a triangle keeps its full outline."""
    simplified = measure.approximate_polygon(ring, tolerance) if tolerance > 0 else ring
    if len(simplified) >= 4:  # closed: the first point repeats
        ring = simplified
    return ring[:-1] if np.array_equal(ring[0], ring[-1]) else ring


def mask_to_outlines(mask: np.ndarray, tolerance: float = 1.0) -> list[Outline]:
    """Outer rings with their holes, one Outline per connected part (8-connectivity of the
    foreground, as marching squares separates parts that only touch at a corner otherwise)."""
    mask = _check_mask(mask)
    padded = np.pad(mask, 1).astype(np.float32)  # closes outlines that touch the border
    exteriors: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="high", positive_orientation="high"):
        # (row, col) of the padded array -> (x, y) with pixel centres at +0.5
        ring = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
        (exteriors if _signed_area(ring) < 0 else holes).append(ring)
    outlines = [Outline(_simplify(r, tolerance)) for r in exteriors]
    for hole in holes:
        # the innermost exterior holding the hole owns it
        owners = [o for o, r in zip(outlines, exteriors, strict=True) if measure.points_in_poly(hole[:1], r)[0]]
        if owners:
            min(owners, key=lambda o: abs(_signed_area(o.exterior))).holes.append(_simplify(hole, tolerance))
    return outlines


def rings_to_mask(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Even-odd fill of (x, y) rings in pixel units: a pixel is set when its centre is inside."""
    mask = np.zeros((height, width), dtype=bool)
    for ring in rings:
        rr, cc = draw.polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=(height, width))
        part = np.zeros_like(mask)
        part[rr, cc] = True
        mask ^= part
    return mask


def _join(ring: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``other`` spliced into ``ring`` at their closest points: out along a cut, round, and back
    along the same cut, which even-odd filling counts twice, i.e. not at all."""
    distances = np.linalg.norm(ring[:, None, :] - other[None, :, :], axis=2)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    loop = np.concatenate([other[j:], other[: j + 1]])
    return np.concatenate([ring[: i + 1], loop, ring[i:]])


def bridge_holes(outline: Outline) -> np.ndarray:
    """One ring for a part with holes: each hole joined to the outer ring by a zero-width cut, so
    that tools drawing one simple polygon per region (Label Studio) still leave the holes empty."""
    ring = outline.exterior
    for hole in outline.holes:
        ring = _join(ring, hole)
    return ring


def join_outlines(outlines: list[Outline]) -> np.ndarray:
    """One ring for a whole mask: every part (largest first) and hole joined by zero-width cuts,
    so that an object in several pieces is still one region."""
    rings = [bridge_holes(o) for o in sorted(outlines, key=lambda o: -abs(_signed_area(o.exterior)))]
    ring = rings[0]
    for other in rings[1:]:
        ring = _join(ring, other)
    return ring


def polygon_to_mask(points_percent: list[list[float]], height: int, width: int) -> np.ndarray:
    ring = np.asarray(points_percent, dtype=np.float64).reshape(-1, 2) * [width / 100.0, height / 100.0]
    return rings_to_mask([ring], height, width)


# -- boxes and COCO RLE ------------------------------------------------------------------------------

def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in pixels, x1/y1 exclusive; None for an empty mask."""
    mask = _check_mask(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(_check_mask(mask).astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO files hold for crowd regions
        compressed = coco_mask.frPyObjects(rle, *rle["size"])
    else:
        compressed = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(compressed).astype(bool)


# -- Label Studio results ----------------------------------------------------------------------------

def _region(kind: str, from_name: str, to_name: str, height: int, width: int, value: dict[str, Any],
            score: float | None) -> Result:
    result: Result = {"from_name": from_name, "to_name": to_name, "type": kind,
                      "original_width": width, "original_height": height, "image_rotation": 0, "value": value}
    if score is not None:
        result["score"] = round(float(score), 4)
    return result


def brush_result(mask: np.ndarray, label: str, from_name: str, to_name: str,
                 score: float | None = None) -> Result:
    height, width = np.shape(mask)
    value = {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}
    return _region("brushlabels", from_name, to_name, height, width, value, score)


def polygon_results(mask: np.ndarray, label: str, from_name: str, to_name: str, score: float | None = None,
                    tolerance: float = 1.0) -> list[Result]:
    """One polygon per connected part, holes bridged into it."""
    height, width = np.shape(mask)
    results = []
    for outline in mask_to_outlines(mask, tolerance):
        ring = bridge_holes(outline) * [100.0 / width, 100.0 / height]
        value = {"points": np.round(ring, 4).tolist(), "closed": True, "polygonlabels": [label]}
        results.append(_region("polygonlabels", from_name, to_name, height, width, value, score))
    return results


def polygon_result(mask: np.ndarray, label: str, from_name: str, to_name: str, score: float | None = None,
                   tolerance: float = 1.0) -> Result | None:
    """The whole mask as one polygon region (parts and holes joined); None for an empty mask."""
    height, width = np.shape(mask)
    outlines = mask_to_outlines(mask, tolerance)
    if not outlines:
        return None
    ring = join_outlines(outlines) * [100.0 / width, 100.0 / height]
    value = {"points": np.round(ring, 4).tolist(), "closed": True, "polygonlabels": [label]}
    return _region("polygonlabels", from_name, to_name, height, width, value, score)


def box_result(box: tuple[float, float, float, float], height: int, width: int, label: str, from_name: str,
               to_name: str, score: float | None = None) -> Result:
    x0, y0, x1, y1 = box
    value = {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
             "height": 100.0 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}
    return _region("rectanglelabels", from_name, to_name, height, width, value, score)


def caption_result(text: str, from_name: str, to_name: str) -> Result:
    return {"from_name": from_name, "to_name": to_name, "type": "textarea", "value": {"text": [text]}}


def result_label(result: Result) -> str | None:
    labels = result.get("value", {}).get(result.get("type", ""), [])
    return labels[0] if labels else None


def result_to_mask(result: Result) -> np.ndarray | None:
    """The pixels of a brush, polygon or rectangle result; None for other kinds (text, choices)."""
    value, kind = result.get("value", {}), result.get("type")
    try:
        height, width = int(result["original_height"]), int(result["original_width"])
    except (KeyError, TypeError, ValueError):
        return None
    if kind == "brushlabels" and value.get("format") == "rle":
        return brush_rle_to_mask(value["rle"], height, width)
    if kind == "polygonlabels":
        return polygon_to_mask(value["points"], height, width)
    if kind == "rectanglelabels":
        # Label Studio rotates a rectangle about its top-left corner, in pixels.
        x0, y0 = value["x"] * width / 100.0, value["y"] * height / 100.0
        w, h = value["width"] * width / 100.0, value["height"] * height / 100.0
        t = np.deg2rad(float(value.get("rotation", 0)))
        rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        ring = np.array([[0, 0], [w, 0], [w, h], [0, h]]) @ rotation.T + [x0, y0]
        return rings_to_mask([ring], height, width)
    return None


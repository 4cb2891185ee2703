"""Mask conversions: brush RLE and COCO RLE round trips are exact; polygons within the tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from annotator.convert import (
    box_result,
    brush_result,
    brush_rle_to_mask,
    coco_rle_to_mask,
    mask_to_box,
    mask_to_brush_rle,
    mask_to_coco_rle,
    mask_to_outlines,
    polygon_result,
    polygon_results,
    result_to_mask,
    rings_to_mask,
)


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _masks() -> dict[str, np.ndarray]:
    h, w = 60, 80
    ring = _disk(h, w, 30, 40, 20) & ~_disk(h, w, 30, 40, 8)  # a hole
    parts = _disk(h, w, 15, 15, 9) | _disk(h, w, 45, 62, 12)  # two parts
    parts_and_holes = ring.copy()
    parts_and_holes[2:10, 2:12] = True
    parts_and_holes[25:35, 36:44] = True  # an island inside the hole
    border = np.zeros((h, w), bool)
    border[:, :20] = True
    border[50:, :] = True  # touches three sides
    one = np.zeros((h, w), bool)
    one[17, 23] = True
    corner_pixel = np.zeros((h, w), bool)
    corner_pixel[0, w - 1] = True
    diagonal = np.eye(h, w, dtype=bool)  # parts touching only at corners
    noise = np.random.default_rng(0).random((h, w)) > 0.7
    return {"hole": ring, "two parts": parts, "parts and holes": parts_and_holes, "border": border,
            "one pixel": one, "corner pixel": corner_pixel, "full": np.ones((h, w), bool), "diagonal": diagonal,
            "noise": noise}


MASKS = _masks()


@pytest.mark.parametrize("name", MASKS)
def test_brush_rle_round_trip_is_exact(name: str) -> None:
    mask = MASKS[name]
    rle = mask_to_brush_rle(mask)
    assert np.array_equal(brush_rle_to_mask(rle, *mask.shape), mask)
    result = brush_result(mask, "car", "mask", "image", score=0.5)
    assert result["value"]["brushlabels"] == ["car"] and result["score"] == 0.5
    assert np.array_equal(result_to_mask(result), mask)


@pytest.mark.parametrize("name", MASKS)
def test_coco_rle_round_trip_is_exact(name: str) -> None:
    mask = MASKS[name]
    rle = mask_to_coco_rle(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(coco_rle_to_mask(rle), mask)


def test_brush_rle_of_a_wrong_size_is_refused() -> None:
    rle = mask_to_brush_rle(MASKS["hole"])
    with pytest.raises(ValueError, match="pixels"):
        brush_rle_to_mask(rle, 10, 10)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_brush_rle(np.zeros((3, 4, 2)))


@pytest.mark.parametrize("name", MASKS)
def test_unsimplified_outlines_rasterize_to_the_same_pixels(name: str) -> None:
    mask = MASKS[name]
    rings = [r for o in mask_to_outlines(mask, tolerance=0) for r in o.rings()]
    assert np.array_equal(rings_to_mask(rings, *mask.shape), mask)


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0])
def test_polygon_results_stay_within_the_tolerance(name: str, tolerance: float) -> None:
    """Label Studio polygons (percent, holes bridged into one ring per part): every pixel that changes
    lies within tolerance + 1 pixel of the mask's outline (the +1: a pixel centre against its edge)."""
    mask = MASKS[name]
    results = polygon_results(mask, "car", "poly", "image", score=0.9, tolerance=tolerance)
    labelled, parts = ndimage.label(mask, structure=np.ones((3, 3)))
    assert len(results) == parts
    back = np.zeros_like(mask)
    for r in results:
        assert r["value"]["polygonlabels"] == ["car"] and r["value"]["closed"]
        points = np.asarray(r["value"]["points"])
        assert points.min() >= 0 and points.max() <= 100
        back |= result_to_mask(r)
    outline = mask ^ ndimage.binary_erosion(mask, border_value=0)
    outline |= ndimage.binary_dilation(mask) & ~mask
    distance = ndimage.distance_transform_edt(~outline)
    assert distance[back != mask].max(initial=0) <= tolerance + 1
    if tolerance == 0:  # no simplification: only the zero-width cuts into holes may touch pixel centres
        assert (back != mask).sum() <= sum(len(o.holes) for o in mask_to_outlines(mask, 0)) * max(mask.shape)


def test_one_object_is_one_polygon_whatever_its_parts() -> None:
    """An object in several parts (and holes) becomes ONE polygon region, parts joined by zero-width
    cuts; unsimplified it rasterizes back to the very same pixels. The fixture masks plus 200 seeded
    random masks (noise, and opened noise with many blobs and holes)."""
    cases = list(MASKS.values())
    for seed in range(200):
        rng = np.random.default_rng(seed)
        h, w = (int(v) for v in rng.integers(8, 60, 2))
        noise = rng.random((h, w)) > rng.uniform(0.5, 0.9)
        cases.append(ndimage.binary_opening(noise) if seed % 2 else noise)
    checked = 0
    for mask in cases:
        result = polygon_result(mask, "car", "poly", "image", score=0.5, tolerance=0)
        if not mask.any():
            assert result is None
            continue
        assert result is not None and result["value"]["polygonlabels"] == ["car"]
        assert np.array_equal(result_to_mask(result), mask)
        checked += len(mask_to_outlines(mask, 0)) > 1
    assert checked > 100  # most cases really have several parts


def test_boxes() -> None:
    mask = MASKS["two parts"]
    box = mask_to_box(mask)
    assert box == (6, 6, 75, 58)
    result = box_result(box, *mask.shape, label="car", from_name="bbox", to_name="image")
    filled = result_to_mask(result)
    rows, cols = np.nonzero(filled)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == box
    assert mask_to_box(np.zeros((4, 4), bool)) is None
    rotated = dict(result, value=dict(result["value"], rotation=90))
    # rotated about its top-left corner by 90 degrees: the box now lies left of x0
    assert np.nonzero(result_to_mask(rotated))[1].max() < box[0]

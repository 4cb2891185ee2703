"""Segmentation post-processing exactly as the official ``evaluate()`` does it (SPEC §4).

All rules run at the original image resolution, over all Q queries including the class query.
Mask logits are upsampled lazily, only for the queries a rule needs and a few at a time: bicubic
interpolation is per channel, so upsampling a subset equals taking the subset of the full
upsampling. Memory is bounded by what a task returns, not by queries x pixels: a 12-megapixel
photo never holds more than ``FULL_SIZE_BUDGET`` bytes of full-size float masks at once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xdecoder.masks import MaskStack, PackedMask
from xdecoder.modeling.common import resize_masks

# Up to ~1 MP, 16 queries are upsampled at a time; larger images take fewer, which only changes the float
# summation order of semantic and instance mask scores (~1e-7 relative).
CHUNK = 16
FULL_SIZE_BUDGET = 64 * 2**20  # bytes of full-size float32 masks upsampled at once (at least one mask)


class MaskUpsampler:
    """Low-res mask logits [Q, h4, w4] -> logits at the original size, for chosen queries.

    Official rule: resize to the padded input size, crop the valid region, resize to the
    original size, both bicubic with antialias.

    Past ``budget`` bytes of full-size float masks the rules work in bands of rows: the last
    resize is separable (rows are resized along x independently, then mixed along y with a few
    taps), so a band of output rows is the x-resize of the few input rows it needs, mixed by the
    exact y-weights torch uses (read off by resizing an identity matrix). Only the float order of
    the y-mix differs from one full resize (~1e-7 relative); images within the budget take the
    full resize and stay bit-identical.
    """

    def __init__(self, low_res: Tensor, padded: tuple[int, int], resized: tuple[int, int],
                 original: tuple[int, int], budget: int | None = None) -> None:
        self.low_res, self.padded, self.resized, self.original = low_res, padded, resized, original
        self.budget = FULL_SIZE_BUDGET if budget is None else budget
        self._stage1: Tensor | None = None  # [Q, h, w] first resize + crop, kept in band mode
        self._y_weights: Tensor | None = None  # [H, h]

    def chunk_size(self, rows: int | None = None) -> int:
        h, w = self.original
        return max(1, min(CHUNK, self.budget // (4 * (h if rows is None else rows) * w)))

    def band_rows(self, per_pixel: int) -> int:
        """Rows per band so that ``per_pixel`` float32 values per pixel of a band fit the budget."""
        h, w = self.original
        return max(1, min(h, self.budget // (4 * max(per_pixel, 1) * w)))

    def bands(self, per_pixel: int) -> list[tuple[int, int]]:
        rows = self.band_rows(per_pixel)
        return [(y, min(y + rows, self.original[0])) for y in range(0, self.original[0], rows)]

    def chunks(self, queries: Tensor, band: tuple[int, int] | None = None
               ) -> Iterator[tuple[int, Tensor]]:
        """(offset into ``queries``, logits [n, H, W] or [n, y1-y0, W] for a band) for consecutive
        chunks of ``queries``."""
        if band is not None and band == (0, self.original[0]):
            band = None
        n = self.chunk_size(None if band is None else band[1] - band[0])
        for start in range(0, queries.numel(), n):
            chosen = queries[start:start + n]
            yield start, (self._upsample(self.low_res[chosen]) if band is None else self._rows(chosen, *band))

    def __call__(self, queries: Tensor | None = None) -> Tensor:
        """All chosen queries at once: for checks on small images; the tasks use ``chunks``."""
        if queries is None:
            queries = torch.arange(self.low_res.shape[0])
        if queries.numel() == 0:
            return self.low_res.new_zeros((0, *self.original))
        return torch.cat([chunk for _, chunk in self.chunks(queries)])

    def _first(self, masks: Tensor) -> Tensor:
        return resize_masks(masks[None], self.padded)[..., : self.resized[0], : self.resized[1]]

    def _upsample(self, masks: Tensor) -> Tensor:
        return resize_masks(self._first(masks), self.original)[0]

    def _rows(self, queries: Tensor, y0: int, y1: int) -> Tensor:
        if self._stage1 is None:
            every = torch.arange(self.low_res.shape[0])
            self._stage1 = torch.cat([self._first(self.low_res[every[i:i + CHUNK]])[0]
                                      for i in range(0, every.numel(), CHUNK)])
            h = self.resized[0]
            eye = torch.eye(h, dtype=torch.float32, device=self.low_res.device)
            self._y_weights = resize_masks(eye, (self.original[0], h))
        assert self._y_weights is not None
        weights = self._y_weights[y0:y1]
        used = weights.ne(0).any(0).nonzero().flatten()
        c0, c1 = int(used[0]), int(used[-1]) + 1
        rows = self._stage1[queries, c0:c1]
        rows = resize_masks(rows, (c1 - c0, self.original[1]))  # along x only
        return torch.einsum("rc,ncw->nrw", weights[:, c0:c1], rows)


def semantic_scores(logits: Tensor, upsample: MaskUpsampler) -> Tensor:
    """[K, H, W] = sum_q softmax(logits)[q, :K] * sigmoid(mask_q) (background dropped after softmax)."""
    probs = logits.softmax(-1)[:, :-1]
    scores = probs.new_zeros((probs.shape[1], *upsample.original))
    for y0, y1 in upsample.bands(CHUNK):
        _add_semantic(scores[:, y0:y1], probs, upsample, (y0, y1))
    return scores


def semantic_labels(logits: Tensor, upsample: MaskUpsampler) -> tuple[Tensor, Tensor]:
    """([H, W] best score, [H, W] int32 class) of ``semantic_scores`` a band at a time: memory is the
    output plus one band of K scores, not K full-size maps."""
    probs = logits.softmax(-1)[:, :-1]
    h, w = upsample.original
    best, label = probs.new_empty((h, w)), torch.empty((h, w), dtype=torch.int32)
    for y0, y1 in upsample.bands(CHUNK + probs.shape[1]):
        band = probs.new_zeros((probs.shape[1], y1 - y0, w))
        _add_semantic(band, probs, upsample, (y0, y1))
        best[y0:y1], label[y0:y1] = band.max(0)
    return best, label


def _add_semantic(out: Tensor, probs: Tensor, upsample: MaskUpsampler, band: tuple[int, int]) -> None:
    for start, masks in upsample.chunks(torch.arange(probs.shape[0]), band):
        out += torch.einsum("qc,qhw->chw", probs[start:start + masks.shape[0]], masks.sigmoid_())


@dataclass(frozen=True)
class SegmentInfo:
    id: int  # value in the segment map, from 1
    category_id: int  # index into the class names
    isthing: bool
    score: float  # class probability of the query
    query: int


def panoptic_segments(logits: Tensor, upsample: MaskUpsampler, stuff_ids: Collection[int], *,
                      object_mask_threshold: float, overlap_threshold: float
                      ) -> tuple[Tensor, list[SegmentInfo]]:
    """Mask2Former's rule: returns an int32 segment map (0 = void) and per-segment info.

    The rule's masks are disjoint (pixel p can only belong to its argmax query), so one pass, a band
    of rows at a time, keeps per pixel the owner query and whether the owner's probability is >= 0.5,
    and per query the three areas the rule tests; the segments are then chosen in query order and
    the map is filled from a query -> segment table. A strict > across chunks keeps the first
    maximum, as argmax does.
    """
    num_classes = logits.shape[-1] - 1
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    h, w = upsample.original
    segment_map = torch.zeros((h, w), dtype=torch.int32)
    segments: list[SegmentInfo] = []
    n = kept.numel()
    if n == 0:
        return segment_map, segments
    owner = torch.zeros((h, w), dtype=torch.int16 if n < 2**15 else torch.int32)
    owner_probable = torch.zeros((h, w), dtype=torch.bool)
    mask_areas = torch.zeros(n, dtype=torch.int64)  # pixels owned
    original_areas = torch.zeros(n, dtype=torch.int64)  # pixels with probability >= 0.5
    both = torch.zeros(n, dtype=torch.int64)  # owned and >= 0.5
    # per band pixel: the chunk's floats, the kept queries' bits, running max and owner
    for y0, y1 in upsample.bands(min(CHUNK, n) + 3 + -(-n // 4)):
        best = torch.full((y1 - y0, w), -torch.inf)
        ids = torch.zeros((y1 - y0, w), dtype=torch.int64)
        probable = torch.empty((n, y1 - y0, w), dtype=torch.bool)
        for start, masks in upsample.chunks(kept, (y0, y1)):
            masks.sigmoid_()
            probable[start:start + masks.shape[0]] = masks >= 0.5
            values, index = masks.mul_(scores[kept[start:start + masks.shape[0]]].view(-1, 1, 1)).max(0)
            better = values > best
            best = torch.where(better, values, best)
            ids = torch.where(better, index + start, ids)
            del values, index, better, masks
        own = probable.gather(0, ids[None])[0]
        mask_areas += torch.bincount(ids.flatten(), minlength=n)
        original_areas += probable.flatten(1).sum(1)
        both += torch.bincount(ids[own], minlength=n)
        owner[y0:y1], owner_probable[y0:y1] = ids, own
        del probable, best
    table = torch.zeros(n, dtype=torch.int32)  # kept query -> segment id (0 = none)
    stuff_segment: dict[int, int] = {}
    for k in range(n):
        label = int(labels[kept[k]])
        is_thing = label not in stuff_ids
        mask_area, original_area = int(mask_areas[k]), int(original_areas[k])
        if mask_area == 0 or original_area == 0:
            continue
        if int(both[k]) == 0 or mask_area / original_area < overlap_threshold:
            continue
        if not is_thing and label in stuff_segment:  # one segment per stuff class
            table[k] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        if not is_thing:
            stuff_segment[label] = segment_id
        table[k] = segment_id
        segments.append(SegmentInfo(segment_id, label, is_thing, float(scores[kept[k]]), int(kept[k])))
    for y0, y1 in upsample.bands(4):
        segment_map[y0:y1] = torch.where(owner_probable[y0:y1], table[owner[y0:y1].long()], 0)
    return segment_map, segments


def instances(logits: Tensor, upsample: MaskUpsampler, stuff_ids: Collection[int], *,
              detections: int) -> dict[str, Tensor | MaskStack]:
    """Top-k (query, class) pairs; stuff classes dropped; sorted by final score, best first.

    Each distinct query's mask is upsampled once, a chunk at a time, and kept packed
    (``MaskStack``: cropped to its box, 1 bit per pixel); pairs of one query share it.
    """
    num_classes = logits.shape[1] - 1
    probs = logits.softmax(-1)[:, :-1].flatten()
    top_scores, top_idx = probs.topk(min(detections, probs.numel()), sorted=False)
    classes, queries = top_idx % num_classes, top_idx // num_classes
    if stuff_ids:
        keep = torch.tensor([int(c) not in stuff_ids for c in classes], dtype=torch.bool)
        top_scores, classes, queries = top_scores[keep], classes[keep], queries[keep]
    unique, inverse = queries.unique(return_inverse=True)
    packed: list[PackedMask] = []
    unique_scores = torch.zeros(unique.numel())
    for i, (mask, score) in enumerate(binary_masks(upsample, unique)):
        packed.append(mask)
        unique_scores[i] = score
    final = top_scores * unique_scores[inverse]
    order = final.argsort(descending=True, stable=True)
    masks = MaskStack([packed[int(inverse[i])] for i in order], upsample.original)
    return {"masks": masks, "scores": final[order], "classes": classes[order],
            "queries": queries[order], "class_scores": top_scores[order]}


def binary_masks(upsample: MaskUpsampler, queries: Tensor) -> Iterator[tuple[PackedMask, Tensor]]:
    """Per query, in order: its binary mask (logit > 0) packed, and the mean mask probability inside it.

    When one full-size float mask is past the budget (~17 MP), each mask is made a band of rows at a
    time and packed row by row, so the full-size float mask never exists."""
    h, w = upsample.original
    if 4 * h * w <= upsample.budget:
        for _, chunk in upsample.chunks(queries):
            binary = chunk > 0
            # in place: no full-size float temporaries
            scores = chunk.sigmoid_().mul_(binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            for j in range(chunk.shape[0]):
                yield PackedMask.from_dense(binary[j]), scores[j]
            del binary, chunk
        return
    bands = upsample.bands(2)
    for q in queries:
        rows, total, area = [], torch.zeros((), dtype=torch.float64), 0
        for band in bands:
            logits = next(upsample.chunks(q[None], band))[1][0]
            binary = logits > 0
            total += logits.sigmoid_().mul_(binary).sum(dtype=torch.float64)
            area += int(binary.sum())
            rows.append(np.packbits(binary.numpy(), axis=1))
            del logits, binary
        yield PackedMask.from_rows(np.concatenate(rows), (h, w)), (total / (area + 1e-6)).float()


def masks_to_boxes(masks: Tensor) -> Tensor:
    """[N, H, W] bool -> [N, 4] float XYXY in pixels (exclusive max); zeros for empty masks."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if rows.numel():
            boxes[i] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    return boxes


def nearest_resize(mask: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def uncertainty(logits: Tensor, mask_logits: Tensor) -> float:
    """Per-image uncertainty in [0, 1] from the model's own outputs, to review the least certain first.

    Mean of two terms at the decoder's resolution (no upsampling): (1) over pixels, 1 - the margin between
    the best and second-best normalized semantic scores (class ambiguity); (2) the share of pixels whose
    most confident query's mask probability is within 0.2 of the 0.5 threshold (boundary ambiguity).
    """
    probs = logits.softmax(-1)[:, :-1]
    sigmoid = mask_logits.sigmoid()
    scores = torch.einsum("qc,qhw->chw", probs, sigmoid)
    scores = scores / scores.sum(0, keepdim=True).clamp_min(1e-6)
    top2 = scores.topk(min(2, scores.shape[0]), dim=0).values
    margin = top2[0] - (top2[1] if top2.shape[0] > 1 else 0)
    owner = (probs.max(-1).values[:, None, None] * sigmoid).argmax(0)
    owner_prob = sigmoid.gather(0, owner[None])[0]
    boundary = ((owner_prob - 0.5).abs() < 0.2).float().mean()
    return float(0.5 * (1 - margin.mean()) + 0.5 * boundary)

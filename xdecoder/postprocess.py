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

import torch
import torch.nn.functional as F
from torch import Tensor

from xdecoder.modeling.common import resize_masks

# Up to ~1 MP, 16 queries are upsampled at a time; larger images take fewer, which only changes the float
# summation order of semantic and instance mask scores (~1e-7 relative).
CHUNK = 16
FULL_SIZE_BUDGET = 64 * 2**20  # bytes of full-size float32 masks upsampled at once (at least one mask)


class MaskUpsampler:
    """Low-res mask logits [Q, h4, w4] -> logits at the original size, for chosen queries.

    Official rule: resize to the padded input size, crop the valid region, resize to the
    original size, both bicubic with antialias.
    """

    def __init__(self, low_res: Tensor, padded: tuple[int, int], resized: tuple[int, int],
                 original: tuple[int, int]) -> None:
        self.low_res, self.padded, self.resized, self.original = low_res, padded, resized, original

    def chunk_size(self) -> int:
        h, w = self.original
        return max(1, min(CHUNK, FULL_SIZE_BUDGET // (4 * h * w)))

    def chunks(self, queries: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(offset into ``queries``, logits [n, H, W]) for consecutive chunks of ``queries``."""
        n = self.chunk_size()
        for start in range(0, queries.numel(), n):
            yield start, self._upsample(self.low_res[queries[start:start + n]])

    def __call__(self, queries: Tensor | None = None) -> Tensor:
        """All chosen queries at once: for checks on small images; the tasks use ``chunks``."""
        if queries is None:
            queries = torch.arange(self.low_res.shape[0])
        if queries.numel() == 0:
            return self.low_res.new_zeros((0, *self.original))
        return torch.cat([chunk for _, chunk in self.chunks(queries)])

    def _upsample(self, masks: Tensor) -> Tensor:
        x = resize_masks(masks[None], self.padded)[..., : self.resized[0], : self.resized[1]]
        return resize_masks(x, self.original)[0]


def semantic_scores(logits: Tensor, upsample: MaskUpsampler) -> Tensor:
    """[K, H, W] = sum_q softmax(logits)[q, :K] * sigmoid(mask_q) (background dropped after softmax)."""
    probs = logits.softmax(-1)[:, :-1]
    scores = probs.new_zeros((probs.shape[1], *upsample.original))
    for start, masks in upsample.chunks(torch.arange(probs.shape[0])):
        scores += torch.einsum("qc,qhw->chw", probs[start:start + masks.shape[0]], masks.sigmoid_())
    return scores


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

    Two passes over the kept queries' masks, a chunk at a time: the first takes the argmax of
    score x mask probability (a strict > keeps the first maximum, as argmax does), the second
    emits the segments in query order.
    """
    num_classes = logits.shape[-1] - 1
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    h, w = upsample.original
    segment_map = torch.zeros((h, w), dtype=torch.int32)
    segments: list[SegmentInfo] = []
    if kept.numel() == 0:
        return segment_map, segments
    best = torch.full((h, w), -torch.inf)
    ids = torch.zeros((h, w), dtype=torch.int64)
    for start, masks in upsample.chunks(kept):
        values, index = (scores[kept[start:start + masks.shape[0]]].view(-1, 1, 1) * masks.sigmoid_()).max(0)
        better = values > best
        best = torch.where(better, values, best)
        ids = torch.where(better, index + start, ids)
        del values, index, better
    del best
    mask_areas = torch.bincount(ids.flatten(), minlength=kept.numel())
    stuff_segment: dict[int, int] = {}
    for start, masks in upsample.chunks(kept):
        for j in range(masks.shape[0]):
            k = start + j
            label = int(labels[kept[k]])
            is_thing = label not in stuff_ids
            probable = masks[j].sigmoid_() >= 0.5
            mask_area = int(mask_areas[k])
            original_area = int(probable.sum())
            if mask_area == 0 or original_area == 0:
                continue
            mask = (ids == k) & probable
            if not bool(mask.any()) or mask_area / original_area < overlap_threshold:
                continue
            if not is_thing and label in stuff_segment:  # one segment per stuff class
                segment_map[mask] = stuff_segment[label]
                continue
            segment_id = len(segments) + 1
            if not is_thing:
                stuff_segment[label] = segment_id
            segment_map[mask] = segment_id
            segments.append(SegmentInfo(segment_id, label, is_thing, float(scores[kept[k]]), int(kept[k])))
    return segment_map, segments


def instances(logits: Tensor, upsample: MaskUpsampler, stuff_ids: Collection[int], *,
              detections: int) -> dict[str, Tensor]:
    """Top-k (query, class) pairs; stuff classes dropped; sorted by final score, best first.

    Each distinct query's mask is upsampled once, a chunk at a time, and written as a binary mask
    into the returned [N, H, W] array, which is then put in score order in place.
    """
    num_classes = logits.shape[1] - 1
    probs = logits.softmax(-1)[:, :-1].flatten()
    top_scores, top_idx = probs.topk(min(detections, probs.numel()), sorted=False)
    classes, queries = top_idx % num_classes, top_idx // num_classes
    if stuff_ids:
        keep = torch.tensor([int(c) not in stuff_ids for c in classes], dtype=torch.bool)
        top_scores, classes, queries = top_scores[keep], classes[keep], queries[keep]
    unique, inverse = queries.unique(return_inverse=True)
    masks = torch.empty((queries.numel(), *upsample.original), dtype=torch.bool)
    unique_scores = torch.zeros(unique.numel())
    for start, chunk in upsample.chunks(unique):
        binary = chunk > 0
        unique_scores[start:start + chunk.shape[0]] = (chunk.sigmoid_().flatten(1) * binary.flatten(1)).sum(1) \
            / (binary.flatten(1).sum(1) + 1e-6)
        for j in range(chunk.shape[0]):
            masks[inverse == start + j] = binary[j]
        del binary
    final = top_scores * unique_scores[inverse]
    order = final.argsort(descending=True, stable=True)
    _permute_rows(masks, order.tolist())
    return {"masks": masks, "scores": final[order], "classes": classes[order],
            "queries": queries[order], "class_scores": top_scores[order]}


def _permute_rows(rows: Tensor, order: list[int]) -> None:
    """rows = rows[order] in place, holding one row aside per cycle of the permutation."""
    done = [False] * len(order)
    for i in range(len(order)):
        if done[i] or order[i] == i:
            continue
        held, j = rows[i].clone(), i
        while True:
            done[j] = True
            if order[j] == i:
                rows[j] = held
                break
            rows[j] = rows[order[j]]
            j = order[j]


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

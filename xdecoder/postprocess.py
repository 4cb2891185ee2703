"""Segmentation post-processing exactly as the official ``evaluate()`` does it (SPEC §4).

All rules run at the original image resolution, over all Q queries including the class query.
Mask logits are upsampled lazily and only for the queries a rule needs: bicubic interpolation
is per channel, so upsampling a subset equals taking the subset of the full upsampling, and a
4000x3000 photo never holds 101 full-size masks at once.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xdecoder.modeling.common import resize_masks

CHUNK = 16  # queries upsampled at a time


class MaskUpsampler:
    """Low-res mask logits [Q, h4, w4] -> logits at the original size, for chosen queries.

    Official rule: resize to the padded input size, crop the valid region, resize to the
    original size, both bicubic with antialias.
    """

    def __init__(self, low_res: Tensor, padded: tuple[int, int], resized: tuple[int, int],
                 original: tuple[int, int]) -> None:
        self.low_res, self.padded, self.resized, self.original = low_res, padded, resized, original

    def __call__(self, queries: Tensor | None = None) -> Tensor:
        masks = self.low_res if queries is None else self.low_res[queries]
        if masks.shape[0] == 0:
            return masks.new_zeros((0, *self.original))
        return torch.cat([self._upsample(chunk) for chunk in masks.split(CHUNK)])

    def _upsample(self, masks: Tensor) -> Tensor:
        x = resize_masks(masks[None], self.padded)[..., : self.resized[0], : self.resized[1]]
        return resize_masks(x, self.original)[0]


def semantic_scores(logits: Tensor, upsample: MaskUpsampler) -> Tensor:
    """[K, H, W] = sum_q softmax(logits)[q, :K] * sigmoid(mask_q) (background dropped after softmax)."""
    probs = logits.softmax(-1)[:, :-1]
    scores = probs.new_zeros((probs.shape[1], *upsample.original))
    for start in range(0, probs.shape[0], CHUNK):
        idx = torch.arange(start, min(start + CHUNK, probs.shape[0]))
        scores += torch.einsum("qc,qhw->chw", probs[idx], upsample(idx).sigmoid())
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
    """Mask2Former's rule: returns an int32 segment map (0 = void) and per-segment info."""
    num_classes = logits.shape[-1] - 1
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    h, w = upsample.original
    segment_map = torch.zeros((h, w), dtype=torch.int32)
    segments: list[SegmentInfo] = []
    if kept.numel() == 0:
        return segment_map, segments
    masks = upsample(kept).sigmoid()
    ids = (scores[kept].view(-1, 1, 1) * masks).argmax(0)
    stuff_segment: dict[int, int] = {}
    for k in range(kept.numel()):
        label = int(labels[kept[k]])
        is_thing = label not in stuff_ids
        region = ids == k
        mask_area = int(region.sum())
        original_area = int((masks[k] >= 0.5).sum())
        mask = region & (masks[k] >= 0.5)
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
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
    """Top-k (query, class) pairs; stuff classes dropped; sorted by final score, best first."""
    _num_queries, num_classes = logits.shape[0], logits.shape[1] - 1
    probs = logits.softmax(-1)[:, :-1].flatten()
    top_scores, top_idx = probs.topk(min(detections, probs.numel()), sorted=False)
    classes, queries = top_idx % num_classes, top_idx // num_classes
    if stuff_ids:
        keep = torch.tensor([int(c) not in stuff_ids for c in classes], dtype=torch.bool)
        top_scores, classes, queries = top_scores[keep], classes[keep], queries[keep]
    unique, inverse = queries.unique(return_inverse=True)
    mask_logits = upsample(unique)[inverse] if unique.numel() else upsample(unique)
    binary = mask_logits > 0
    mask_scores = (mask_logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) \
        / (binary.flatten(1).sum(1) + 1e-6)
    final = top_scores * mask_scores
    order = final.argsort(descending=True, stable=True)
    return {"masks": binary[order], "scores": final[order], "classes": classes[order],
            "queries": queries[order], "class_scores": top_scores[order]}


def masks_to_boxes(masks: Tensor) -> Tensor:
    """[N, H, W] bool -> [N, 4] float XYXY in pixels (exclusive max); zeros for empty masks."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        ys, xs = torch.where(m)
        if ys.numel():
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
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

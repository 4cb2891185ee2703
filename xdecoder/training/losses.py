"""X-Decoder's training objectives (SPEC §1; the official criterion is the reference for each term).

* segmentation: Hungarian matching of the latent object queries to ground-truth masks
  (class cost 2, mask BCE 5, dice 5, on sampled points), then class cross-entropy against the
  class-name embeddings with a down-weighted no-object class (0.1 officially), and mask BCE + dice on
  sampled points for the matched queries;
* grounding: the grounding queries are matched to the phrases' masks; cross-entropy over queries
  of the phrase similarity, plus BCE + dice of the matched query's mask;
* captioning: teacher forcing, position t predicts token t+1;
* retrieval: symmetric image-text contrastive loss on both image embeddings of the ensemble,
  optionally with extra negative captions per image (image -> text direction only).
Points are sampled uniformly (the official code oversamples uncertain points; uniform keeps it
simple and still unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from xdecoder.tokenizer import EOS_ID


@dataclass(frozen=True)
class LossWeights:
    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    grounding: float = 1.0
    caption: float = 2.0
    retrieval: float = 2.0
    # Down-weights the ~95 unmatched queries' "no object" targets; a higher value drives them to no object
    # sooner, which matters for semantic inference (it sums class x mask over every query).
    no_object: float = 0.1
    # Not in the official criterion, which starts from a pre-trained text encoder whose class names are
    # already apart. Trained from nothing, the names of classes that look alike to a young backbone
    # collapse onto one embedding, and then neither side gets a gradient to tell them apart.
    names: float = 0.0


def point_logits(masks: Tensor, points: Tensor) -> Tensor:
    """Sample [N, h, w] maps at normalized points [P, 2] (x, y in [0, 1]) -> [N, P]."""
    grid = (points * 2 - 1)[None, None].expand(masks.shape[0], 1, -1, -1)
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0, 0]


def dice_cost(pred: Tensor, target: Tensor) -> Tensor:
    """Pairwise dice cost [Q, N] from logits [Q, P] and binary targets [N, P]."""
    p = pred.sigmoid()
    numerator = 2 * p @ target.t()
    denominator = p.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def bce_cost(pred: Tensor, target: Tensor) -> Tensor:
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.t() + neg @ (1 - target).t()) / pred.shape[-1]


def mask_losses(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean BCE and dice of matched pairs: logits [M, P], targets [M, P]."""
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(-1)
    p = pred.sigmoid()
    dice = 1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)
    return bce.mean(), dice.mean()


@torch.no_grad()
def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def segmentation_loss(logits: Tensor, masks: Tensor, labels: Tensor, gt_masks: Tensor, num_points: int,
                      weights: LossWeights, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One image. logits [Q, K+1] (last = no-object), masks [Q, h, w] logits at the decoder's 1/4
    resolution, labels [N], gt_masks [N, H, W] float at the (padded) input resolution. The last
    query is the image-level class query and is not matched."""
    q = logits.shape[0] - 1
    points = torch.rand(num_points, 2, generator=generator, device=masks.device)
    pred_points = point_logits(masks[:q], points)
    gt_points = point_logits(gt_masks, points)
    with torch.no_grad():
        prob = logits[:q].softmax(-1)
        cost = (-weights.cls * prob[:, labels] + weights.mask * bce_cost(pred_points, gt_points)
                + weights.dice * dice_cost(pred_points, gt_points))
    rows, cols = hungarian(cost)
    target_classes = torch.full((logits.shape[0],), logits.shape[1] - 1, dtype=torch.long, device=logits.device)
    target_classes[rows] = labels[cols]
    class_weight = torch.ones(logits.shape[1], device=logits.device)
    class_weight[-1] = weights.no_object
    loss_cls = F.cross_entropy(logits[:q], target_classes[:q], weight=class_weight)
    bce, dice = mask_losses(pred_points[rows], gt_points[cols])
    return {"cls": weights.cls * loss_cls, "mask": weights.mask * bce, "dice": weights.dice * dice}


def name_separation_loss(first: Tensor, second: Tensor, logit_scale: Tensor, weights: LossWeights) -> Tensor:
    """Each class name under one template [K, D] must be nearest the same name under another [K, D]
    (symmetric InfoNCE over the names): keeps class-name embeddings apart while the image side learns."""
    a, b = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return weights.names * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def grounding_loss(embeddings: Tensor, masks: Tensor, phrase_embeddings: Tensor, gt_masks: Tensor,
                   logit_scale: Tensor, num_points: int, weights: LossWeights,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One image. Grounding queries: embeddings [G, D], masks [G, h, w]; phrases [P, D] with their
    masks [P, H, W]. Each phrase is matched to one query (similarity and mask cost)."""
    points = torch.rand(num_points, 2, generator=generator, device=masks.device)
    pred_points = point_logits(masks, points)
    gt_points = point_logits(gt_masks, points)
    v = F.normalize(embeddings, dim=-1)
    t = F.normalize(phrase_embeddings, dim=-1)
    sim = logit_scale.exp().clamp(max=100) * v @ t.t()  # [G, P]
    with torch.no_grad():
        cost = (-weights.cls * sim.softmax(0) + weights.mask * bce_cost(pred_points, gt_points)
                + weights.dice * dice_cost(pred_points, gt_points))
    rows, cols = hungarian(cost)
    loss_sim = F.cross_entropy(sim[:, cols].t(), rows.to(sim.device))
    bce, dice = mask_losses(pred_points[rows], gt_points[cols])
    return {"grounding": weights.grounding * (loss_sim + bce + dice)}


def caption_loss(token_logits: Tensor, token_ids: Tensor, weights: LossWeights) -> Tensor:
    """Teacher forcing: logits [B, L, V] at position t predict token t+1; positions after each
    caption's end token are ignored."""
    targets = token_ids[:, 1:].clone()
    after_end = (targets == EOS_ID).long().cumsum(1) - (targets == EOS_ID).long() > 0
    targets[after_end] = -100
    return weights.caption * F.cross_entropy(token_logits[:, :-1].reshape(-1, token_logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)


def retrieval_loss(image_embeddings: list[Tensor], text_embeddings: Tensor, logit_scale: Tensor,
                   weights: LossWeights, negatives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between each image embedding [B, D] and the caption embeddings [B, D];
    ``negatives`` [M, D] are captions of no image in the batch (near misses: one colour, count, shape
    or ground changed), extra wrong answers for every image's image -> text term."""
    t = F.normalize(text_embeddings, dim=-1)
    b = t.shape[0]
    candidates = t if negatives is None else torch.cat([t, F.normalize(negatives, dim=-1)])
    target = torch.arange(b, device=t.device)
    total = t.new_zeros(())
    for image in image_embeddings:
        logits = logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ candidates.t()
        total = total + (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].t(), target)) / 2
    return weights.retrieval * total / len(image_embeddings)

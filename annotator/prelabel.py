"""X-Decoder outputs as Label Studio predictions: one encoded image in, one prediction out.

Each region carries its score; the prediction's score is the model's confidence in the whole image
(1 - uncertainty), so sorting a project by prediction score puts the least certain images first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from annotator.convert import Result, box_result, brush_result, caption_result, mask_to_box, polygon_result
from annotator.labeling import LabelingConfig, Target
from annotator.vocabulary import TextEncoder, match_phrase, model_text_encoder
from xdecoder.predictor import Features, Predictor

Prediction = dict[str, Any]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrelabelSettings:
    polygon_tolerance: float = 1.0  # pixels
    min_area: int = 4  # pixels; smaller regions are dropped
    captions: bool = True


@dataclass
class LabelledRegion:
    label: str  # from ``regions``: X-Decoder's class name (``config.routes`` maps it to each control's label)
    mask: np.ndarray
    score: float


@dataclass
class LabelTally:
    """Per (control, label): regions made and regions dropped under the threshold, over a run."""

    made: Counter[tuple[str, str]] = field(default_factory=Counter)
    under: Counter[tuple[str, str]] = field(default_factory=Counter)

    def summary(self, config: LabelingConfig) -> list[dict[str, Any]]:
        """One row per control and label, in config order; ``found`` is False for labels the
        model never proposed (no region, not even under the threshold); ``routed`` is False where
        routing sends no class at all (the label's tool is another control), so none is expected."""
        routed = {(t.from_name, label) for routes in config.routes.values() for t, label in routes}
        rows = []
        for t in config.targets:
            for label in t.labels:
                key = (t.from_name, label)
                rows.append({"control": t.from_name, "label": label, "regions": self.made[key],
                             "under_threshold": self.under[key], "threshold": t.thresholds.get(label),
                             "found": bool(self.made[key] or self.under[key]), "routed": key in routed})
        return rows


SAME_OBJECT_IOU = 0.8  # two instance masks overlapping this much are one object


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def regions(predictor: Predictor, features: Features, config: LabelingConfig) -> list[list[LabelledRegion]]:
    """Every candidate region per image for the project's classes, before thresholds; each mask
    once, with its single best class."""
    names = list(config.class_names)
    out: list[list[LabelledRegion]] = []
    if config.task == "panoptic":
        for result in predictor.panoptic(features, names, stuff=config.stuff):
            out.append([LabelledRegion(s.label, result.segment_map == s.id, s.score) for s in result.segments])
    elif config.task == "instance":
        for inst in predictor.instance(features, names, stuff=config.stuff):
            # The top (query, class) pairs hold one query's mask under several classes, and two queries
            # may find one object: keep the best (they come best first), drop what repeats a kept mask.
            seen: set[int] = set()
            image_regions: list[LabelledRegion] = []
            for k, name in enumerate(inst.labels):
                query = int(inst.queries[k])
                if query in seen:
                    continue
                seen.add(query)
                mask = np.asarray(inst.masks[k], dtype=bool)
                if not any(_iou(mask, r.mask) >= SAME_OBJECT_IOU for r in image_regions):
                    image_regions.append(LabelledRegion(name, mask, float(inst.scores[k])))
            out.append(image_regions)
    else:
        label_of = config.prompts
        for sem in predictor.semantic(features, names, return_scores=True):
            # the semantic scores are unnormalized sums over queries: a region's score is its
            # class's mean share of the pixel's total, in [0, 1]
            assert sem.scores is not None
            share = sem.score_map / np.maximum(sem.scores.sum(0), 1e-6)
            # Synonyms of one label make one region (under the first of their class names).
            merged: dict[str, LabelledRegion] = {}
            for k in np.unique(sem.label_map):
                mask = sem.label_map == k
                r = LabelledRegion(names[int(k)], mask, float(share[mask].mean()))
                key = label_of.get(r.label, r.label)
                if key in merged:
                    m = merged[key]
                    area, extra = m.mask.sum(), r.mask.sum()
                    score = (m.score * area + r.score * extra) / (area + extra)
                    merged[key] = LabelledRegion(m.label, m.mask | r.mask, float(score))
                else:
                    merged[key] = r
            out.append(list(merged.values()))
    return out


def region_results(region: LabelledRegion, targets: Sequence[Target], settings: PrelabelSettings) -> list[Result]:
    """The region in each target control: one result per control (a polygon joins the parts)."""
    results: list[Result] = []
    height, width = region.mask.shape
    for target in targets:
        if target.kind == "brush":
            results.append(brush_result(region.mask, region.label, target.from_name, target.to_name, region.score))
        elif target.kind == "polygon":
            polygon = polygon_result(region.mask, region.label, target.from_name, target.to_name, region.score,
                                     tolerance=settings.polygon_tolerance)
            if polygon is not None:
                results.append(polygon)
        else:
            box = mask_to_box(region.mask)
            if box is not None:
                results.append(box_result(box, height, width, region.label, target.from_name, target.to_name,
                                          region.score))
    return results


def _drawn(mask: np.ndarray, kind: str) -> np.ndarray:
    """What a control shows of a mask: the mask, or for a rectangle its bounding box."""
    if kind != "rectangle":
        return mask
    box = mask_to_box(mask)
    drawn = np.zeros_like(mask, dtype=bool)
    if box is not None:
        drawn[box[1]:box[3], box[0]:box[2]] = True
    return drawn


def routed_results(region: LabelledRegion, config: LabelingConfig, settings: PrelabelSettings,
                   tally: LabelTally | None = None, shown: dict[str, list[np.ndarray]] | None = None
                   ) -> list[Result]:
    """A candidate region in the controls its class is routed to, each under that control's label
    and threshold. ``shown`` (control -> what it shows already, for one image): a region a control
    would show again (IoU >= SAME_OBJECT_IOU; two masks can share one box) is left out there."""
    results: list[Result] = []
    if region.mask.sum() < settings.min_area:
        return results
    for target, label in config.routes.get(region.label, ()):
        key = (target.from_name, label)
        if region.score < target.thresholds.get(label, 0.0):
            if tally is not None:
                tally.under[key] += 1
            continue
        if shown is not None:
            drawn = _drawn(region.mask, target.kind)
            if any(_iou(drawn, other) >= SAME_OBJECT_IOU for other in shown.get(target.from_name, [])):
                continue
            shown.setdefault(target.from_name, []).append(drawn)
        made = region_results(LabelledRegion(label, region.mask, region.score), [target], settings)
        if tally is not None:
            tally.made[key] += len(made)
        results += made
    return results


def predictions(predictor: Predictor, features: Features, config: LabelingConfig, model_version: str,
                settings: PrelabelSettings = PrelabelSettings(), captions: Sequence[str] | None = None,
                tally: LabelTally | None = None) -> list[Prediction]:
    """One Label Studio prediction per encoded image, in order (``captions``: already computed;
    ``tally``: counts regions per control and label)."""
    per_image: list[list[LabelledRegion]] = regions(predictor, features, config) if config.targets \
        else [[] for _ in features]
    if captions is None and config.caption and settings.captions:
        captions = predictor.caption(features)
    uncertainty = predictor.uncertainty(features, list(config.class_names)) if config.class_names \
        else np.zeros(len(features), dtype=np.float32)
    out = []
    for k, image_regions in enumerate(per_image):
        result: list[Result] = []
        shown: dict[str, list[np.ndarray]] = {}
        for region in image_regions:
            result += routed_results(region, config, settings, tally, shown)
        if captions is not None and config.caption and settings.captions:
            result.append(caption_result(captions[k], config.caption, config.image))
        out.append({"result": _with_ids(result), "score": round(1.0 - float(uncertainty[k]), 4),
                    "model_version": model_version})
    return out


def _with_ids(results: list[Result]) -> list[Result]:
    # Stable region ids: the editor links a region's parts by id, and ids make exports readable.
    return [dict(r, id=f"xd{i}") for i, r in enumerate(results)]


# -- interactive -------------------------------------------------------------------------------------

def _class_label(config: LabelingConfig, target: Target, name: str) -> str | None:
    """The label a candidate of X-Decoder class ``name`` carries in ``target``."""
    return next((label for t, label in config.routes.get(name, ()) if t == target), None) \
        or target.vocabulary.exact(name)


def interactive(predictor: Predictor, features: Features, config: LabelingConfig, context: Mapping[str, Any],
                model_version: str, settings: PrelabelSettings = PrelabelSettings(),
                encoder: TextEncoder | None = None, mapping: Mapping[str, str] | None = None) -> Prediction:
    """The annotator's prompt in one image (``features`` holds it): a typed phrase gives its
    referring-segmentation mask, labelled by meaning (``match_phrase``; ``encoder`` defaults to the
    model's own text encoder; an ambiguous phrase gives no region and is logged); a keypoint or a
    box picks the best predicted region under it."""
    (height, width) = features.images[0].geometry.original
    encoder = encoder or model_text_encoder(predictor)
    result: list[Result] = []
    candidates: list[LabelledRegion] | None = None  # computed once, for the first click or box
    for prompt in context.get("result", []):
        kind, value = prompt.get("type"), prompt.get("value", {})
        labels = value.get(kind, []) if isinstance(value, dict) else []
        if kind == "textarea":
            text = " ".join(value.get("text", [])).strip()
            target = config.mask_target()
            if not text or target is None:
                continue
            match = match_phrase(text, target.vocabulary, encoder, mapping=mapping)
            if match.label is None:
                log.warning("typed phrase %r: no label of %r decided (%s: %s %.3f, %s %s); type 'label: phrase'",
                            text, target.from_name, match.how, match.closest, match.similarity, match.runner_up,
                            match.runner_up_similarity)
                continue
            grounded = predictor.ground(features, [match.phrase])[0][0]
            if not grounded.mask.any():
                continue
            probability = 1.0 / (1.0 + np.exp(-grounded.logits[grounded.mask]))
            score = float(probability.mean())
            result += region_results(LabelledRegion(match.label, grounded.mask, score), [target], settings)
        elif kind in ("keypointlabels", "rectanglelabels"):
            if candidates is None:
                candidates = regions(predictor, features, _as_instances(config))[0]
            if kind == "keypointlabels":
                col = min(int(value["x"] * width / 100.0), width - 1)
                row = min(int(value["y"] * height / 100.0), height - 1)
                hits = [r for r in candidates if r.mask[row, col]]
                best = max(hits, key=lambda r: r.score, default=None)
            else:
                box = np.zeros((height, width), dtype=bool)
                x0, y0 = int(value["x"] * width / 100.0), int(value["y"] * height / 100.0)
                x1 = int(np.ceil((value["x"] + value["width"]) * width / 100.0))
                y1 = int(np.ceil((value["y"] + value["height"]) * height / 100.0))
                box[y0:y1, x0:x1] = True
                ious = [(r.mask & box).sum() / max((r.mask | box).sum(), 1) for r in candidates]
                best = candidates[int(np.argmax(ious))] if candidates and max(ious) > 0 else None
            if best is None:
                continue
            target = config.mask_target(labels[0] if labels else None)
            if target is None:
                continue
            # the prompt's own label (by name, else by meaning), else the candidate's class
            label = (target.label_named(labels[0]) or match_phrase(labels[0], target.vocabulary, encoder,
                                                                   mapping=mapping).label) if labels else None
            label = label or _class_label(config, target, best.label)
            if label is None:
                log.warning("no label of %r for the region under the %s", target.from_name, kind)
                continue
            result += region_results(LabelledRegion(label, best.mask, best.score), [target], settings)
    return {"result": _with_ids(result), "score": max((r.get("score", 0.0) for r in result), default=0.0),
            "model_version": model_version}


def _as_instances(config: LabelingConfig) -> LabelingConfig:
    # Overlapping candidates (instance mode) so that a click can pick a thing lying on stuff.
    return replace(config, task="instance", stuff=frozenset())

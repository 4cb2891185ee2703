"""X-Decoder outputs as Label Studio predictions: one encoded image in, one prediction out.

Each region carries its score; the prediction's score is the model's confidence in the whole image
(1 - uncertainty), so sorting a project by prediction score puts the least certain images first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from annotator.convert import Result, box_result, brush_result, caption_result, mask_to_box, polygon_results
from annotator.labeling import LabelingConfig, Target
from xdecoder.predictor import Features, Predictor

Prediction = dict[str, Any]


@dataclass(frozen=True)
class PrelabelSettings:
    polygon_tolerance: float = 1.0  # pixels
    min_area: int = 4  # pixels; smaller regions are dropped
    captions: bool = True


@dataclass
class LabelledRegion:
    label: str
    mask: np.ndarray
    score: float


def regions(predictor: Predictor, features: Features, config: LabelingConfig) -> list[list[LabelledRegion]]:
    """Every candidate region per image for the project's classes, before thresholds."""
    names = config.class_names
    label_of = config.prompts
    out: list[list[LabelledRegion]] = []
    if config.task == "panoptic":
        for result in predictor.panoptic(features, names, stuff=config.stuff):
            out.append([LabelledRegion(label_of[s.label], result.segment_map == s.id, s.score)
                        for s in result.segments])
    elif config.task == "instance":
        for inst in predictor.instance(features, names, stuff=config.stuff):
            out.append([LabelledRegion(label_of[name], inst.masks[k], float(inst.scores[k]))
                        for k, name in enumerate(inst.labels)])
    else:
        for sem in predictor.semantic(features, names, return_scores=True):
            # the semantic scores are unnormalized sums over queries: a region's score is its
            # class's mean share of the pixel's total, in [0, 1]
            assert sem.scores is not None
            share = sem.score_map / np.maximum(sem.scores.sum(0), 1e-6)
            image_regions = []
            for k in np.unique(sem.label_map):
                mask = sem.label_map == k
                image_regions.append(LabelledRegion(label_of[names[int(k)]], mask, float(share[mask].mean())))
            # Synonyms of one label make one region.
            merged: dict[str, LabelledRegion] = {}
            for r in image_regions:
                if r.label in merged:
                    m = merged[r.label]
                    area, extra = m.mask.sum(), r.mask.sum()
                    score = (m.score * area + r.score * extra) / (area + extra)
                    merged[r.label] = LabelledRegion(r.label, m.mask | r.mask, float(score))
                else:
                    merged[r.label] = r
            out.append(list(merged.values()))
    return out


def region_results(region: LabelledRegion, targets: Sequence[Target], settings: PrelabelSettings) -> list[Result]:
    results: list[Result] = []
    height, width = region.mask.shape
    for target in targets:
        if target.kind == "brush":
            results.append(brush_result(region.mask, region.label, target.from_name, target.to_name, region.score))
        elif target.kind == "polygon":
            results += polygon_results(region.mask, region.label, target.from_name, target.to_name, region.score,
                                       tolerance=settings.polygon_tolerance)
        else:
            box = mask_to_box(region.mask)
            if box is not None:
                results.append(box_result(box, height, width, region.label, target.from_name, target.to_name,
                                          region.score))
    return results


def predictions(predictor: Predictor, features: Features, config: LabelingConfig, model_version: str,
                settings: PrelabelSettings = PrelabelSettings(), captions: Sequence[str] | None = None
                ) -> list[Prediction]:
    """One Label Studio prediction per encoded image, in order (``captions``: already computed)."""
    per_image: list[list[LabelledRegion]] = regions(predictor, features, config) if config.targets \
        else [[] for _ in features]
    if captions is None and config.caption and settings.captions:
        captions = predictor.caption(features)
    uncertainty = predictor.uncertainty(features, config.class_names) if config.class_names \
        else np.zeros(len(features), dtype=np.float32)
    out = []
    for k, image_regions in enumerate(per_image):
        result: list[Result] = []
        for region in image_regions:
            if region.score < config.thresholds.get(region.label, 0.0) or region.mask.sum() < settings.min_area:
                continue
            result += region_results(region, config.targets_for(region.label), settings)
        if captions is not None and config.caption and settings.captions:
            result.append(caption_result(captions[k], config.caption, config.image))
        out.append({"result": _with_ids(result), "score": round(1.0 - float(uncertainty[k]), 4),
                    "model_version": model_version})
    return out


def _with_ids(results: list[Result]) -> list[Result]:
    # Stable region ids: the editor links a region's parts by id, and ids make exports readable.
    return [dict(r, id=f"xd{i}") for i, r in enumerate(results)]


# -- interactive -------------------------------------------------------------------------------------

def _mask_target(config: LabelingConfig, label: str | None) -> Target | None:
    kinds = {"brush": 0, "polygon": 1, "rectangle": 2}
    pool = config.targets_for(label) if label else []
    pool = pool or list(config.targets)
    return min(pool, key=lambda t: kinds[t.kind]) if pool else None


def interactive(predictor: Predictor, features: Features, config: LabelingConfig, context: Mapping[str, Any],
                model_version: str, settings: PrelabelSettings = PrelabelSettings()) -> Prediction:
    """The annotator's prompt in one image (``features`` holds it): a typed phrase gives its
    referring-segmentation mask; a keypoint or a box picks the best predicted region under it."""
    (height, width) = features.images[0].geometry.original
    result: list[Result] = []
    candidates: list[LabelledRegion] | None = None  # computed once, for the first click or box
    for prompt in context.get("result", []):
        kind, value = prompt.get("type"), prompt.get("value", {})
        labels = value.get(kind, []) if isinstance(value, dict) else []
        if kind == "textarea":
            text = " ".join(value.get("text", [])).strip()
            if not text:
                continue
            grounded = predictor.ground(features, [text])[0][0]
            probability = 1.0 / (1.0 + np.exp(-grounded.logits[grounded.mask]))
            label = config.prompts.get(text) or (labels[0] if labels else None)
            target = _mask_target(config, label)
            if target is None or not grounded.mask.any():
                continue
            label = label if label in target.labels else target.labels[0]
            score = float(probability.mean())
            result += region_results(LabelledRegion(label, grounded.mask, score), [target], settings)
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
            label = labels[0] if labels and config.targets_for(labels[0]) else best.label
            target = _mask_target(config, label)
            if target is not None:
                result += region_results(LabelledRegion(label, best.mask, best.score), [target], settings)
    return {"result": _with_ids(result), "score": max((r.get("score", 0.0) for r in result), default=0.0),
            "model_version": model_version}


def _as_instances(config: LabelingConfig) -> LabelingConfig:
    # Overlapping candidates (instance mode) so that a click can pick a thing lying on stuff.
    return replace(config, task="instance", stuff=frozenset())

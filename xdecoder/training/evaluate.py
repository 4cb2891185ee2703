"""Held-out metrics on synthetic scenes: semantic mIoU, panoptic PQ, referring IoU, text->image
R@1, caption exact match and BLEU-4 — all through the public Predictor, as a user would get them."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU

from xdecoder.predictor import Predictor
from xdecoder.training.synthetic import CLASSES, STUFF, Scene


def bleu4(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu) with one reference per candidate, on whitespace tokens, no smoothing, in [0, 1]."""
    score = BLEU(tokenize="none", smooth_method="none", effective_order=False)
    percent = float(score.corpus_score(list(candidates), [list(references)]).score)
    return min(1.0, percent / 100)  # sacrebleu's percent can overshoot 100 by a rounding step


def normalize_caption(text: str) -> str:
    """Lower-case words only: CLIP decoding spaces out punctuation, references do not."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def panoptic_quality(pred_map: np.ndarray, pred_classes: dict[int, int], scene: Scene,
                     stats: dict[int, list[float]]) -> None:
    """Accumulate per-class [sum IoU of matches, TP, FP, FN] (a match is IoU > 0.5, same class)."""
    matched_pred: set[int] = set()
    for seg in scene.segments:
        gt = scene.mask(seg.id)
        s = stats.setdefault(seg.category_id, [0.0, 0, 0, 0])
        best = None
        for pid, cls in pred_classes.items():
            if cls == seg.category_id and pid not in matched_pred:
                iou = _iou(pred_map == pid, gt)
                if iou > 0.5:
                    best = (pid, iou)
                    break
        if best:
            matched_pred.add(best[0])
            s[0] += best[1]
            s[1] += 1
        else:
            s[3] += 1
    for pid, cls in pred_classes.items():
        if pid not in matched_pred:
            stats.setdefault(cls, [0.0, 0, 0, 0])[2] += 1


def recall_at_1(scores: np.ndarray, captions: Sequence[str]) -> tuple[float, float]:
    """Text -> image R@1 from scores [images, captions] (caption i describes image i): the share of captions
    whose own image ranks first, and the share whose first image has that very caption. Synthetic scenes
    repeat captions ("a red circle on sand"), and no text can rank one of those scenes above another."""
    best = scores.argmax(0)
    own = float(np.mean(best == np.arange(len(captions))))
    same = float(np.mean([captions[b] == c for b, c in zip(best, captions, strict=True)]))
    return own, same


def evaluate(predictor: Predictor, scenes: Sequence[Scene], class_names: Sequence[str] = CLASSES,
             stuff: Sequence[str] = STUFF) -> dict[str, float]:
    """Held-out metrics; ``iou/<class>`` per class present. Segment category ids index ``class_names``."""
    names = list(class_names)
    inter = np.zeros(len(names))
    union = np.zeros(len(names))
    pq_stats: dict[int, list[float]] = {}
    ref_ious: list[float] = []
    captions: list[str] = []
    image_vectors = []
    for scene in scenes:
        features = predictor.encode(scene.image)
        label_map = predictor.semantic(features, names)[0].label_map
        gt_labels = np.zeros_like(label_map)
        for seg in scene.segments:
            gt_labels[scene.mask(seg.id)] = seg.category_id
        for c in range(len(names)):
            p, g = label_map == c, gt_labels == c
            inter[c] += np.logical_and(p, g).sum()
            union[c] += np.logical_or(p, g).sum()
        panoptic = predictor.panoptic(features, names, stuff=stuff)[0]
        panoptic_quality(panoptic.segment_map, {s.id: s.category_id for s in panoptic.segments}, scene, pq_stats)
        if scene.phrases:
            ids = list(scene.phrases)
            results = predictor.ground(features, [scene.phrases[i] for i in ids])[0]
            ref_ious += [_iou(r.mask, scene.mask(i)) for r, i in zip(results, ids, strict=True)]
        captions.append(normalize_caption(predictor.caption(features)[0]))
        image_vectors.append(predictor.image_embeddings(features)[0])
    present = union > 0
    pq_per_class = [s[0] / (s[1] + 0.5 * s[2] + 0.5 * s[3]) for s in pq_stats.values() if s[1] + s[2] + s[3]]
    queries = [s.caption for s in scenes]
    references = [normalize_caption(q) for q in queries]
    r_at_1, r_at_1_caption = recall_at_1(np.stack(image_vectors) @ predictor.text_query_embeddings(queries).T, queries)
    return {
        "miou": float((inter[present] / union[present]).mean()),
        "pq": float(np.mean(pq_per_class)) if pq_per_class else 0.0,
        "referring_iou": float(np.mean(ref_ious)) if ref_ious else 0.0,
        "r_at_1": r_at_1,
        "r_at_1_caption": r_at_1_caption,
        "caption_exact": float(np.mean([c == r for c, r in zip(captions, references, strict=True)])),
        "bleu4": bleu4(captions, references),
        **{f"iou/{names[c]}": float(inter[c] / union[c]) for c in np.flatnonzero(present)},
    }

"""The model pass of ingestion: one ``encode`` per batch, then the outputs asked for (image vectors
always; region vectors and captions when ``outputs`` names them) and the Label Studio pre-labels of
items that came from a project. A batch the model fails on is retried one item at a time, so only
the items it fails on become failures."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from annotator.prelabel import predictions
from xdecoder.predictor import Features, Predictor
from xdecoder.results import Region
from xdlabel.decoding import Decoded, is_transient_fetch, reason, uri_key
from xdlabel.outputs import ALL_OUTPUTS

if TYPE_CHECKING:
    from xdlabel.ingest import LabelStudioPush

log = logging.getLogger("xdlabel.ingest")


@dataclass
class InferredBatch:
    """What one model pass produced for a batch, plus the batch's failed inputs."""

    decoded: list[Decoded]
    failures: list[Decoded]
    vectors: np.ndarray | None = None
    regions: list[list[Region]] | None = None
    captions: list[str | None] | None = None  # None per image when not asked for
    ls_predictions: dict[int, dict[str, object]] = field(default_factory=dict)  # batch index -> prediction

    @classmethod
    def concat(cls, parts: Sequence[InferredBatch]) -> InferredBatch:
        """One batch holding the parts' images and failures, in order."""
        out = cls([d for part in parts for d in part.decoded], [f for part in parts for f in part.failures])
        done = [part for part in parts if part.decoded]
        if done:
            assert all(p.vectors is not None and p.regions is not None and p.captions is not None for p in done)
            out.vectors = np.concatenate([part.vectors for part in done if part.vectors is not None])
            out.regions = [r for part in done if part.regions is not None for r in part.regions]
            out.captions = [c for part in done if part.captions is not None for c in part.captions]
            offset = 0
            for part in done:
                out.ls_predictions.update({offset + k: v for k, v in part.ls_predictions.items()})
                offset += len(part.decoded)
        return out


def infer(predictor: Predictor, batch: list[Decoded], failures: list[Decoded],
          push: LabelStudioPush | None = None, outputs: Collection[str] = ALL_OUTPUTS) -> InferredBatch:
    """One model pass: image vectors, and region vectors and captions when ``outputs`` asks for them
    (else no regions and None captions, their work skipped), plus the Label Studio pre-labels of the
    decoded images that came from a project."""
    out = InferredBatch(batch, failures)
    if batch:
        features = predictor.encode([d.rgb for d in batch if d.rgb is not None])
        out.vectors = predictor.image_embeddings(features)
        out.regions = predictor.region_embeddings(features) if "regions" in outputs else [[] for _ in features]
        # Label Studio pre-labels may hold the caption: made for a push whatever ``outputs`` says.
        want_captions = "caption" in outputs or push is not None
        out.captions = list(predictor.caption(features)) if want_captions else [None] * len(features)
        projects = {d.item.meta["ls_project"] for d in batch if "ls_project" in d.item.meta} if push else set()
        for project_id in sorted(projects):
            assert push is not None
            members = [k for k, d in enumerate(batch) if d.item.meta.get("ls_project") == project_id]
            subset = Features([features.images[k] for k in members])
            made = predictions(predictor, subset, push.config(project_id), push.model_version, push.prelabel,
                               captions=[out.captions[k] or "" for k in members])
            out.ls_predictions.update(zip(members, made, strict=True))
    for d in batch:  # pixels are not needed past the model; keep what is written
        d.size = (d.rgb.shape[1], d.rgb.shape[0]) if d.rgb is not None else None
        d.rgb = None
    return out


def infer_each(predictor: Predictor, batch: list[Decoded], failures: list[Decoded],
               push: LabelStudioPush | None = None, outputs: Collection[str] = ALL_OUTPUTS) -> InferredBatch:
    """``infer``, and when the batch's pass fails, one item at a time so that only the items the
    model (or Label Studio's labeling config) fails on become failures: tried again next run."""
    try:
        return infer(predictor, batch, failures, push, outputs)
    except Exception as err:  # noqa: BLE001
        if len(batch) <= 1:
            for d in batch:
                log.warning("%s: model pass failed: %s", d.item.uri, reason(err))
                failures.append(Decoded(d.item, uri_key(d.item.uri), error=f"model: {reason(err)}",
                                        transient=is_transient_fetch(err)))
            return InferredBatch([], failures)
    return InferredBatch.concat([InferredBatch([], failures)]
                                + [infer_each(predictor, [d], [], push, outputs) for d in batch])

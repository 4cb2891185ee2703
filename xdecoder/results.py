"""What the Predictor returns: plain dataclasses of numpy arrays in original image coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xdecoder.masks import MaskStack, PackedMask


@dataclass
class SemanticResult:
    label_map: np.ndarray  # [H, W] int32 index into class_names
    score_map: np.ndarray  # [H, W] float32 score of the chosen class
    class_names: list[str]
    scores: np.ndarray | None = None  # [K, H, W] float32, when asked for


@dataclass
class Segment:
    id: int
    category_id: int
    label: str
    isthing: bool
    score: float
    area: int
    box: tuple[float, float, float, float]  # XYXY pixels
    query: int


@dataclass
class PanopticResult:
    segment_map: np.ndarray  # [H, W] int32, 0 = void, else Segment.id
    segments: list[Segment]


@dataclass
class InstanceResult:
    masks: MaskStack  # N packed masks: masks[i] is a dense [H, W] bool mask, np.asarray(masks) all of them
    boxes: np.ndarray  # [N, 4] float32 XYXY pixels, from the masks
    scores: np.ndarray  # [N] class score x mask score, descending
    category_ids: np.ndarray  # [N] int64
    labels: list[str]
    queries: np.ndarray  # [N] decoder query of each instance


@dataclass
class GroundingResult:
    phrase: str
    mask: np.ndarray  # [H, W] bool
    logits: np.ndarray  # [H, W] float32 mask logits (mask = logits > 0)
    score: float  # exp(logit_scale) (clamped at 100) x cosine of the chosen query and the phrase
    query: int


@dataclass
class Region:
    packed: PackedMask  # the mask, cropped to its box and bit-packed
    box: tuple[float, float, float, float]
    embedding: np.ndarray  # [D] unit vector, comparable with text_embeddings()
    score: float  # objectness x mean mask probability inside the mask (Predictor.region_scores)
    query: int

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool, built on each access."""
        return self.packed.dense()

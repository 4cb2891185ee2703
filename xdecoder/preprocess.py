"""What happens to an image before the network: the predictor's settings, the resize to the short
side (bounded by a pixel budget), the grouping of images by padded size, and the preprocessing
record that a model version's key covers (a vector depends on it as much as on the weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xdecoder.modeling.xdecoder import SIZE_DIVISIBILITY
from xdecoder.transforms import ImageGeometry, ImageInput, padded_shape, resize, to_rgb


@dataclass
class PredictorSettings:
    short_side: int = 512  # official demos: Resize(512), bicubic
    max_size: int | None = None  # torchvision's long-side cap; None as in the official demos
    # Resized pixels at most (the encode's memory grows with them): 512 x 8192, so at short side 512 an
    # aspect ratio up to 16:1 resizes exactly as the official demos (no limit there); past it the image is
    # scaled down to this area and outputs differ from the official code's.
    max_pixels: int | None = 512 * 8192
    object_mask_threshold: float | None = None  # None: the model config's (0.8)
    overlap_threshold: float | None = None
    # A region's score is objectness x mean mask probability inside its mask (see region_embeddings);
    # 0.5 keeps regions whose mask is confident and that are more likely an object than background.
    region_min_score: float = 0.5
    region_vocabulary: tuple[str, ...] = ("object",)  # the classes objectness is measured against
    region_nms_iou: float = 0.8
    max_regions: int = 20
    caption_steps: int | None = None  # None: the model config's (50 for released models)
    # Text -> image score = w * cos(decoder embedding, text) + (1 - w) * cos(backbone embedding, text).
    # 0.5 is the official score; a model trained otherwise may rank better at another w (the bundled
    # model records the one chosen on its validation draws). Only queries depend on it, not stored vectors.
    retrieval_decoder_weight: float = 0.5
    class_cache_size: int = 10_000  # class-name embeddings kept (least recently used dropped first)


def compute_dtype(device: str | torch.device | None) -> torch.dtype:
    """What the predictor computes in on ``device``: float32 on the CPU, bf16 (or fp16 where bf16 is
    missing) autocast on CUDA. Known without building a model, so a version key can name it."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def preprocessing(settings: PredictorSettings, dtype: torch.dtype) -> dict[str, object]:
    """Everything besides config and weights that decides a vector: part of a model version's key."""
    return {"short_side": settings.short_side, "max_size": settings.max_size, "max_pixels": settings.max_pixels,
            "dtype": str(dtype).removeprefix("torch.")}


def prepare(images: Sequence[ImageInput], settings: PredictorSettings) -> list[tuple[ImageGeometry, np.ndarray]]:
    """Each image as RGB uint8 resized as the official demos do (within ``max_size``/``max_pixels``)."""
    prepared = []
    for image in images:
        rgb = to_rgb(image)
        small = resize(rgb, settings.short_side, settings.max_size, settings.max_pixels)
        prepared.append((ImageGeometry(rgb.shape[:2], small.shape[:2]), small))
    return prepared


def size_groups(geometries: Sequence[ImageGeometry], pad_together: bool = False) -> list[list[int]]:
    """Indices of images that share a forward: equal padded size (padding takes part in attention,
    so only then are batched results the one-at-a-time ones), or all of them with ``pad_together``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, geometry in enumerate(geometries):
        key = (0, 0) if pad_together else padded_shape(geometry.resized, SIZE_DIVISIBILITY)
        groups.setdefault(key, []).append(i)
    return list(groups.values())

"""Image input: any PIL image or array -> upright 8-bit RGB -> resized -> normalized, padded batch."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

ImageInput = Image.Image | np.ndarray


class ImageInputError(ValueError):
    """An input that cannot be turned into an RGB image; the message says why."""


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError("image array has NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats or 0-255 floats
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        # The dtype says the bit depth, not the values: a dark 16-bit scan stays dark.
        if arr.dtype.itemsize == 1:
            return np.clip(arr, 0, 255).astype(np.uint8)
        if arr.dtype.itemsize == 2:
            return (np.clip(arr, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ImageInputError(f"{arr.dtype} image array has values outside 0-255; pass uint16 for "
                                  "16-bit images")
        return arr.astype(np.uint8)
    raise ImageInputError(f"unsupported image array dtype {arr.dtype}")


def to_rgb(image: ImageInput) -> np.ndarray:
    """Upright uint8 RGB [H, W, 3]. Applies EXIF orientation; alpha is composited on white."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode == "I":  # 32-bit integer pixels: PIL's mode for 16-bit grayscale files
            return to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
        if image.mode in ("I;16", "I;16B", "I;16L", "F"):
            return to_rgb(np.asarray(image))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"expected a PIL image or numpy array, got {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"expected an [H, W], [H, W, 3] or [H, W, 4] array, got shape {image.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageInputError(f"empty image of shape {image.shape}")
    arr = _array_to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_image(data: bytes, max_pixels: int = 64_000_000) -> tuple[np.ndarray, str]:
    """Encoded image bytes -> (upright RGB uint8 array, the file's PIL mode). Raises ValueError with
    the reason for an empty, unreadable or over-large (decompression bomb) file."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ValueError(f"{image.width}x{image.height} is over the {max_pixels}-pixel limit")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image)), image.mode
    except Exception as err:  # noqa: BLE001 - every decoder failure is a bad input, not a crash
        raise ValueError(f"not a readable image: {type(err).__name__}: {err}") from err


def resized_shape(height: int, width: int, short_side: int, max_size: int | None,
                  max_pixels: int | None = None) -> tuple[int, int]:
    """torchvision ``Resize(short_side, max_size)`` arithmetic: the short side becomes ``short_side``.

    ``max_pixels`` then bounds the resized area (both sides scaled by the same factor, the aspect ratio
    kept to the pixel); images within it are untouched, as the official demos resize them.
    """
    short, long = min(height, width), max(height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    if max_pixels is not None and new_short * new_long > max_pixels:
        scale = math.sqrt(max_pixels / (new_short * new_long))
        new_short, new_long = int(new_short * scale), int(new_long * scale)
    new_short = max(new_short, 1)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def resize(rgb: np.ndarray, short_side: int, max_size: int | None = None,
           max_pixels: int | None = None) -> np.ndarray:
    """PIL bicubic resize, as the official demos do (``transforms.Resize(S, BICUBIC)``)."""
    h, w = resized_shape(rgb.shape[0], rgb.shape[1], short_side, max_size, max_pixels)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.array(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class ImageGeometry:
    original: tuple[int, int]  # (H, W) of the input: outputs are given in this frame
    resized: tuple[int, int]  # (h, w) the network saw, before padding


def pad_batch(images: list[Tensor], divisibility: int = 32) -> Tensor:
    """Zero-pad normalized [3, h, w] images at bottom/right to a common multiple of ``divisibility``."""
    h = max(x.shape[-2] for x in images)
    w = max(x.shape[-1] for x in images)
    h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    return torch.stack([F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) for x in images])


def padded_shape(resized: tuple[int, int], divisibility: int = 32) -> tuple[int, int]:
    return (-(-resized[0] // divisibility) * divisibility, -(-resized[1] // divisibility) * divisibility)

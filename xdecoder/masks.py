"""Binary masks kept cropped to their box and bit-packed.

An instance or region mask of a 48-megapixel photo is 48 MB as a dense bool array; packed it is at
most H*W/8 bytes (6 MB) and usually far less, since only its box is kept. ``dense()`` rebuilds the
full [H, W] mask one at a time, when a caller needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedMask:
    shape: tuple[int, int]  # (H, W) of the full mask
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the True pixels; zeros when empty
    bits: np.ndarray  # np.packbits of rows y0:y1 from column ``x_offset`` on (axis=1)
    area: int
    x_offset: int = -1  # the column of the first bit; -1: x0 (the crop exactly)

    @classmethod
    def from_dense(cls, mask: Tensor | np.ndarray) -> PackedMask:
        m = torch.as_tensor(mask).bool()
        h, w = (int(m.shape[0]), int(m.shape[1]))
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return cls((h, w), (0, 0, 0, 0), np.zeros((0, 0), dtype=np.uint8), 0)
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        crop = m[y0:y1, x0:x1]
        return cls((h, w), (x0, y0, x1, y1), np.packbits(crop.numpy(), axis=1), int(crop.sum()))

    @classmethod
    def from_rows(cls, bits: np.ndarray, shape: tuple[int, int]) -> PackedMask:
        """From np.packbits(mask, axis=1) of the full [H, W] mask, built without the dense mask."""
        rows = np.flatnonzero(bits.any(axis=1))
        if rows.size == 0:
            return cls(shape, (0, 0, 0, 0), np.zeros((0, 0), dtype=np.uint8), 0)
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        kept = bits[y0:y1]
        cols = np.unpackbits(np.bitwise_or.reduce(kept, axis=0), count=shape[1]).nonzero()[0]
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        kept = np.ascontiguousarray(kept[:, x0 // 8: -(-x1 // 8)])
        return cls(shape, (x0, y0, x1, y1), kept, int(np.bitwise_count(kept).sum()), x0 // 8 * 8)

    def crop(self) -> np.ndarray:
        """The [y1-y0, x1-x0] bool crop inside ``box``."""
        x0, y0, x1, y1 = self.box
        start = x0 if self.x_offset < 0 else self.x_offset
        return np.unpackbits(self.bits, axis=1, count=x1 - start)[:, x0 - start:].astype(bool)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        x0, y0, x1, y1 = self.box
        if self.area:
            out[y0:y1, x0:x1] = self.crop()
        return out

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self.dense() if dtype is None else self.dense().astype(dtype)  # type: ignore[call-overload]


class MaskStack(Sequence[np.ndarray]):
    """N packed masks of one image: ``stack[i]`` is a dense [H, W] bool mask, built on demand;
    ``np.asarray(stack)`` the dense [N, H, W] array (N x H x W bytes: for small images only)."""

    def __init__(self, masks: Sequence[PackedMask], shape: tuple[int, int]) -> None:
        self.packed = list(masks)
        self.image_shape = shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.packed), *self.image_shape)

    def __len__(self) -> int:
        return len(self.packed)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> MaskStack: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | MaskStack:
        if isinstance(i, slice):
            return MaskStack(self.packed[i], self.image_shape)
        return self.packed[i].dense()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (m.dense() for m in self.packed)

    def boxes(self) -> np.ndarray:
        """[N, 4] float32 XYXY pixels (exclusive max); zeros for empty masks."""
        return np.array([m.box for m in self.packed], dtype=np.float32).reshape(-1, 4)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in {id(m): m for m in self.packed}.values())

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        for i, m in enumerate(self.packed):
            if m.area:
                x0, y0, x1, y1 = m.box
                out[i, y0:y1, x0:x1] = m.crop()
        return out if dtype is None else out.astype(dtype)  # type: ignore[call-overload]

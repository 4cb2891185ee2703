"""Small building blocks shared by the pixel decoder and the transformer decoder."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvNorm(nn.Conv2d):
    """detectron2's ``Conv2d``: conv -> optional norm -> optional activation.

    Subclassing ``nn.Conv2d`` keeps the official state-dict names (``weight``, ``norm.weight``).
    """

    def __init__(self, *args: object, norm: nn.Module | None = None,
                 activation: Callable[[Tensor], Tensor] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def sine_position_embedding(x: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """DETR sine embedding on an all-valid mask, normalized to 2*pi; returns [B, 2*F, H, W]."""
    b, _, h, w = x.shape
    ones = torch.ones((b, h, w), dtype=torch.float32, device=x.device)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class MLP(nn.Module):
    """Linear layers with ReLU between them (the decoder's ``mask_embed``)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (num_layers - 1)
        outs = [dim_hidden] * (num_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize mask logits [..., H, W] the way X-Decoder does everywhere: bicubic with antialias.

    Not bilinear as in Mask2Former; antialias changes results even when upsampling (SPEC §7.1).
    Always computed in float32: the results are thresholded at 0, and the antialiased kernel
    has no half-precision CPU implementation.
    """
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]) if masks.dim() != 4 else masks
    with torch.autocast(flat.device.type, enabled=False):
        out = F.interpolate(flat.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(*lead, *size)


def project_keys_values(attn: nn.MultiheadAttention, inputs: Tensor, pos: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """An ``nn.MultiheadAttention``'s keys (of inputs + pos) and values (of inputs), [S, B, D]."""
    d = inputs.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    return (F.linear(inputs if pos is None else inputs + pos, w[d:2 * d], b[d:2 * d]),
            F.linear(inputs, w[2 * d:], b[2 * d:]))


def attend_projected(attn: nn.MultiheadAttention, queries: Tensor, keys: Tensor, values: Tensor,
                     mask: Tensor | None = None) -> Tensor:
    """``attn(queries, ., .)`` over keys/values from ``project_keys_values`` (so they can be cached).

    Same head layout as torch's MHA: [L, B, D] -> [B*heads, L, D/heads]; ``mask`` is
    [B*heads, L, S] bool with True = blocked.
    """
    (n, batch, d), s = queries.shape, keys.shape[0]
    heads = attn.num_heads
    q = F.linear(queries, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    q = q.reshape(n, batch * heads, d // heads).transpose(0, 1)
    k = keys.reshape(s, batch * heads, d // heads).transpose(0, 1)
    v = values.reshape(s, batch * heads, d // heads).transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask)
    return attn.out_proj(out.transpose(0, 1).reshape(n, batch, d))

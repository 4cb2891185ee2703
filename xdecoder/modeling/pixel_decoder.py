"""The transformer-encoder FPN pixel decoder (``transformer_encoder_fpn``, SPEC §1.3).

A plain post-norm DETR encoder over res5, then a top-down FPN with GroupNorm(32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from xdecoder.config import PixelDecoderConfig
from xdecoder.modeling.common import ConvNorm, sine_position_embedding


@dataclass
class PixelDecoderOutput:
    mask_features: Tensor  # [B, mask_dim, H/4, W/4]
    multi_scale_features: list[Tensor]  # [/32, /16, /8], each [B, conv_dim, h, w]
    encoder_features: Tensor  # transformer-encoder output on res5, before ``layer_N``


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:  # [HW, B, C]
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, need_weights=False)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dim_feedforward) for _ in range(num_layers))


class Transformer(nn.Module):
    """Holds ``encoder`` only, so the weights keep their official ``transformer.encoder.*`` names."""

    def __init__(self, dim: int, heads: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(dim, heads, dim_feedforward, num_layers)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        b, c, h, w = src.shape
        x = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        for layer in self.encoder.layers:
            x = layer(x, pos)
        return x.permute(1, 2, 0).reshape(b, c, h, w)


def _gn(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, dim)


class PixelDecoder(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], cfg: PixelDecoderConfig) -> None:
        super().__init__()
        dim = cfg.conv_dim
        # Lateral 1x1 "adapter_i" and 3x3 "layer_i" for res2..res4; res5 goes through the encoder.
        for i, ch in enumerate(in_channels[:-1], start=1):
            self.add_module(f"adapter_{i}", ConvNorm(ch, dim, 1, bias=False, norm=_gn(dim)))
            self.add_module(f"layer_{i}", ConvNorm(dim, dim, 3, padding=1, bias=False, norm=_gn(dim),
                                                   activation=F.relu))
        self.mask_features = ConvNorm(dim, cfg.mask_dim, 3, padding=1)
        self.input_proj = ConvNorm(in_channels[-1], dim, 1)
        self.transformer = Transformer(dim, cfg.num_heads, cfg.dim_feedforward, cfg.num_encoder_layers)
        self.num_levels = len(in_channels)
        self.add_module(f"layer_{self.num_levels}", ConvNorm(dim, dim, 3, padding=1, bias=False,
                                                             norm=_gn(dim), activation=F.relu))
        self.conv_dim = dim

    def forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        n = self.num_levels
        res5 = features[f"res{n + 1}"]
        x = self.input_proj(res5)
        x = self.transformer(x, sine_position_embedding(res5, self.conv_dim // 2))
        y = getattr(self, f"layer_{n}")(x)
        multi_scale = [y]
        for i in range(n - 1, 0, -1):
            lateral = getattr(self, f"adapter_{i}")(features[f"res{i + 1}"])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{i}")(y)
            if len(multi_scale) < 3:
                multi_scale.append(y)
        return PixelDecoderOutput(self.mask_features(y), multi_scale, x)

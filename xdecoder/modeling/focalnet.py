"""FocalNet backbones as X-Decoder uses them (SPEC §1.2).

``focal_dw`` (Focal-T release): depth-wise 3x3 convs around both branches, post-LN on the sums.
``focal`` (Focal-L release): no depth-wise convs, post-LN on the branches.
Both return ``res2..res5`` (strides 4..32) in NCHW, each through its own LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdecoder.config import FocalNetConfig


class FocalModulation(nn.Module):
    def __init__(self, dim: int, focal_level: int, focal_window: int) -> None:
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            kernel = 2 * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2, bias=False), nn.GELU()))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, H, W, C]
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2)
        q, ctx, gates = torch.split(x, [c, c, self.focal_level + 1], 1)
        ctx_all: Tensor | float = 0.0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        # Two successive means, as the official code takes them (bit-level parity).
        ctx_global = F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = (ctx_all + ctx_global * gates[:, self.focal_level:]) / (self.focal_level + 1)
        out = q * self.h(ctx_all)
        return self.proj(out.permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FocalBlock(nn.Module):
    def __init__(self, dim: int, cfg: FocalNetConfig, focal_level: int, focal_window: int) -> None:
        super().__init__()
        self.depthwise = cfg.variant == "focal_dw"
        if self.depthwise:
            self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        if self.depthwise:
            self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, H, W]
        if not self.depthwise:
            x = x.permute(0, 2, 3, 1)
            x = x + self.gamma_1 * self.norm1(self.modulation(x))
            x = x + self.gamma_2 * self.norm2(self.mlp(x))
            return x.permute(0, 3, 1, 2)
        x = x + self.dw1(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm1(x + self.gamma_1 * self.modulation(x))
        x = x.permute(0, 3, 1, 2)
        x = x + self.dw2(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm2(x + self.gamma_2 * self.mlp(x))
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Conv embedding + LayerNorm over channels (stem: 7x7/4; downsample: 3x3/2)."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(dim_in, dim_out, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:  # the official PatchEmbed pads right/bottom
            x = F.pad(x, (0, -w % self.stride, 0, -h % self.stride))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FocalStage(nn.Module):
    def __init__(self, dim: int, depth: int, cfg: FocalNetConfig, level: int, window: int,
                 downsample: bool) -> None:
        super().__init__()
        self.blocks: list[FocalBlock] = nn.ModuleList(  # type: ignore[assignment]
            FocalBlock(dim, cfg, level, window) for _ in range(depth))
        self.downsample = PatchEmbed(dim, 2 * dim, 3, 2, 1) if downsample else None


class FocalNet(nn.Module):
    def __init__(self, cfg: FocalNetConfig) -> None:
        super().__init__()
        stem_padding = 3 if cfg.variant == "focal_dw" else 2
        self.patch_embed = PatchEmbed(3, cfg.embed_dim, 7, 4, stem_padding)
        dims = cfg.out_channels
        n = len(cfg.depths)
        self.layers: list[FocalStage] = nn.ModuleList(  # type: ignore[assignment]
            FocalStage(dims[i], cfg.depths[i], cfg, cfg.focal_levels[i], cfg.focal_windows[i],
                       downsample=i < n - 1)
            for i in range(n))
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.out_channels = dims

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.patch_embed(x)
        outs = {}
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x)
            norm = getattr(self, f"norm{i}")
            outs[f"res{i + 2}"] = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs

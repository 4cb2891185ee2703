"""DaViT backbone (d3, d5) as the official X-Decoder code builds it (SPEC §1.2).

No X-Decoder DaViT weights were ever published; the structure and key names follow the
official module so that such a checkpoint would load. Tokens are kept as [B, N, C].
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from xdecoder.config import DaViTConfig

Size = tuple[int, int]


class PreNorm(nn.Module):
    """Residual wrapper: x + fn(norm(x)); ``norm`` may be absent (the depth-wise convs)."""

    def __init__(self, norm: nn.Module | None, fn: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        y, size = self.fn(self.norm(x) if self.norm is not None else x, size)
        return x + y, size


class DepthWiseConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, *size))
        return x.flatten(2).transpose(1, 2), size


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        return self.net(x), size


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        (h, w), (b, _, c), ws = size, x.shape, self.window
        # Zero-pad to whole windows; the official code attends over the padding unmasked.
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = x.shape[1:3]
        x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        bw, n, _ = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        x = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        x = self.proj(x)
        x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return x[:, :h, :w].reshape(b, h * w, c), size


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.groups, c // self.groups).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * n**-0.5, qkv[1], qkv[2]  # scaled by tokens, not channels
        attn = (q.transpose(-1, -2) @ k).softmax(-1)
        x = (attn @ v.transpose(-1, -2)).transpose(-1, -2)
        return self.proj(x.transpose(1, 2).reshape(b, n, c)), size


class DaViTBlock(nn.Module):
    """conv1 -> attention -> conv2 -> ffn, each residual; ``attn_name`` keeps the official key."""

    def __init__(self, dim: int, attn_name: str, attn: nn.Module, mlp_ratio: float) -> None:
        super().__init__()
        self.conv1 = PreNorm(None, DepthWiseConv(dim))
        self.attn_name = attn_name
        self.add_module(attn_name, PreNorm(nn.LayerNorm(dim), attn))
        self.conv2 = PreNorm(None, DepthWiseConv(dim))
        self.ffn = PreNorm(nn.LayerNorm(dim), FeedForward(dim, int(dim * mlp_ratio)))

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        x, size = self.conv1(x, size)
        x, size = getattr(self, self.attn_name)(x, size)
        x, size = self.conv2(x, size)
        return self.ffn(x, size)


class ConvEmbed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int, padding: int,
                 pre_norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim_out, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim_in if pre_norm else dim_out)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, size: Size) -> tuple[Tensor, Size]:
        if x.dim() == 3:  # tokens from the previous stage
            if self.pre_norm:
                x = self.norm(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *size)
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if not self.pre_norm:
            x = self.norm(x)
        return x, size


class DaViT(nn.Module):
    def __init__(self, cfg: DaViTConfig) -> None:
        super().__init__()
        dims = cfg.dims
        self.convs = nn.ModuleList(
            ConvEmbed(3 if i == 0 else dims[i - 1], dims[i], cfg.patch_size[i], cfg.patch_stride[i],
                      cfg.patch_padding[i], cfg.patch_prenorm[i])
            for i in range(len(dims)))
        self.blocks = nn.ModuleList()
        for i, dim in enumerate(dims):
            stage = nn.ModuleList()
            for _ in range(cfg.depths[i]):
                pair = nn.Module()
                pair.spatial_block = DaViTBlock(
                    dim, "window_attn", WindowAttention(dim, cfg.heads[i], cfg.window_size), cfg.mlp_ratio)
                pair.channel_block = DaViTBlock(
                    dim, "channel_attn", ChannelAttention(dim, cfg.groups[i]), cfg.mlp_ratio)
                stage.append(pair)
            self.blocks.append(stage)
        self.out_channels = dims

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size: Size = (x.shape[2], x.shape[3])
        outs = {}
        for i, (conv, stage) in enumerate(zip(self.convs, self.blocks, strict=True)):
            x, size = conv(x, size)
            for pair in stage:  # type: ignore[attr-defined]
                x, size = pair.spatial_block(x, size)
                x, size = pair.channel_block(x, size)
            outs[f"res{i + 2}"] = x.transpose(1, 2).reshape(x.shape[0], -1, *size).contiguous()
        return outs

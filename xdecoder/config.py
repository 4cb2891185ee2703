"""Model configurations as plain frozen dataclasses.

Every named configuration mirrors one official X-Decoder yaml (see SPEC.md §1); the values
that decide which released checkpoint fits are the backbone family, its widths and depths,
and the number of decoder queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class FocalNetConfig:
    variant: Literal["focal_dw", "focal"]  # focal_dw = Focal-T release, focal = Focal-L release
    embed_dim: int
    depths: tuple[int, ...]
    focal_levels: tuple[int, ...]
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    mlp_ratio: float = 4.0

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class DaViTConfig:
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]  # window-attention heads per stage
    groups: tuple[int, ...]  # channel-attention groups per stage
    patch_size: tuple[int, ...]
    patch_stride: tuple[int, ...]
    patch_padding: tuple[int, ...]
    patch_prenorm: tuple[bool, ...]
    window_size: int = 7
    mlp_ratio: float = 4.0

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.dims


@dataclass(frozen=True)
class PixelDecoderConfig:
    conv_dim: int = 512
    mask_dim: int = 512
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_encoder_layers: int = 6


@dataclass(frozen=True)
class DecoderConfig:
    hidden_dim: int = 512
    num_queries: int = 101  # latent queries + 1 class query
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 9  # the yaml's DEC_LAYERS minus one
    captioning_steps: int = 50


@dataclass(frozen=True)
class TextConfig:
    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class XDecoderConfig:
    name: str
    backbone: FocalNetConfig | DaViTConfig
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dim_proj: int = 512
    # Post-processing thresholds of the released yaml (TEST.*).
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    detections_per_image: int = 100
    # Size of criterion.empty_weight in released files (COCO panoptic classes + no-object).
    criterion_classes: int = 133

    @property
    def backbone_dim(self) -> int:
        return self.backbone.out_channels[-1]


def _davit(dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
           patch: int, padding: int) -> DaViTConfig:
    return DaViTConfig(
        dims=dims, depths=depths, heads=heads, groups=heads,
        patch_size=(7, patch, patch, patch), patch_stride=(4, 2, 2, 2),
        patch_padding=(3, padding, padding, padding), patch_prenorm=(False, True, True, True),
    )


CONFIGS: dict[str, XDecoderConfig] = {
    "focalt": XDecoderConfig(
        name="focalt",
        backbone=FocalNetConfig("focal_dw", 96, (2, 2, 6, 2), (3, 3, 3, 3)),
    ),
    "focall": XDecoderConfig(
        name="focall",
        backbone=FocalNetConfig("focal", 192, (2, 2, 18, 2), (4, 4, 4, 4)),
        decoder=DecoderConfig(num_queries=201),
    ),
    "davitd3": XDecoderConfig(
        name="davitd3",
        backbone=_davit((128, 256, 512, 1024), (1, 1, 9, 1), (4, 8, 16, 32), patch=2, padding=0),
        decoder=DecoderConfig(num_queries=201),
    ),
    "davitd5": XDecoderConfig(
        name="davitd5",
        backbone=_davit((256, 512, 1024, 2048), (1, 1, 9, 1), (8, 16, 32, 64), patch=3, padding=1),
        decoder=DecoderConfig(num_queries=201),
    ),
    # The reduced Focal-T of shared/xdecoder/parity (reduced_config.yaml): same code paths,
    # smaller numbers; used for the golden-output parity tests.
    "parity": XDecoderConfig(
        name="parity",
        backbone=FocalNetConfig("focal_dw", 32, (1, 1, 2, 1), (3, 3, 3, 3)),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_heads=4,
                                         dim_feedforward=128, num_encoder_layers=2),
        decoder=DecoderConfig(hidden_dim=64, num_queries=101, num_heads=4, dim_feedforward=128,
                              num_layers=3, captioning_steps=8),
        text=TextConfig(width=64, heads=4, layers=2),
        dim_proj=64,
    ),
}


def get_config(name: str) -> XDecoderConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown X-Decoder config {name!r}; known: {sorted(CONFIGS)}") from None

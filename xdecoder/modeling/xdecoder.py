"""The whole X-Decoder network: backbone -> pixel decoder -> transformer decoder (+ text encoder).

Attribute names (``backbone``, ``sem_seg_head.pixel_decoder``, ``sem_seg_head.predictor``,
``backbone_proj``) are those of the released checkpoints, so their weights load unrenamed.
The module only computes tensors; pre/post-processing and tasks live in ``xdecoder.predictor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xdecoder.config import DaViTConfig, XDecoderConfig
from xdecoder.modeling.davit import DaViT
from xdecoder.modeling.decoder import HeadOutput, TransformerDecoder
from xdecoder.modeling.focalnet import FocalNet
from xdecoder.modeling.pixel_decoder import PixelDecoder
from xdecoder.modeling.text_encoder import LanguageEncoder

PIXEL_MEAN = (123.675, 116.280, 103.530)  # RGB, 0-255 scale
PIXEL_STD = (58.395, 57.120, 57.375)
SIZE_DIVISIBILITY = 32


@dataclass
class ImageFeatures:
    """Everything one image pass computes, shared by every task."""

    mask_features: Tensor  # [B, mask_dim, H/4, W/4]
    multi_scale: list[Tensor]  # decoder memory levels [/32, /16, /8]
    res5: Tensor  # [B, C5, H/32, W/32], for the retrieval ensemble
    head: HeadOutput  # last head of the segmentation pass (class-agnostic parts)


class XDecoderHead(nn.Module):
    predictor: TransformerDecoder
    def __init__(self, cfg: XDecoderConfig, in_channels: tuple[int, ...]) -> None:
        super().__init__()
        if cfg.pixel_decoder.conv_dim != cfg.decoder.hidden_dim:
            raise ValueError("pixel decoder conv_dim must equal decoder hidden_dim (no input_proj)")
        self.pixel_decoder = PixelDecoder(in_channels, cfg.pixel_decoder)
        self.predictor = TransformerDecoder(cfg.decoder, cfg.text, cfg.dim_proj)


class XDecoder(nn.Module):
    pixel_mean: Tensor
    pixel_std: Tensor
    def __init__(self, cfg: XDecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone: nn.Module = DaViT(cfg.backbone) if isinstance(cfg.backbone, DaViTConfig) \
            else FocalNet(cfg.backbone)
        self.sem_seg_head = XDecoderHead(cfg, cfg.backbone.out_channels)
        self.backbone_proj = nn.Parameter(torch.empty(cfg.backbone_dim, cfg.dim_proj))
        nn.init.trunc_normal_(self.backbone_proj, std=0.02)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    @property
    def decoder(self) -> TransformerDecoder:
        return self.sem_seg_head.predictor

    @property
    def language(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    def normalize(self, images: Tensor) -> Tensor:
        """uint8/float RGB [B, 3, H, W] on the 0-255 scale -> normalized float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def encode(self, pixels: Tensor) -> ImageFeatures:
        """Backbone, pixel decoder and the segmentation decoder pass on a normalized, padded batch."""
        feats = self.backbone(pixels)
        pix = self.sem_seg_head.pixel_decoder(feats)
        head = self.decoder(pix.multi_scale_features, pix.mask_features)
        assert isinstance(head, HeadOutput)
        return ImageFeatures(pix.mask_features, pix.multi_scale_features, feats["res5"], head)

    def backbone_embedding(self, res5: Tensor) -> Tensor:
        """Retrieval ensemble's second image embedding: global average of res5 @ backbone_proj."""
        return res5.flatten(2).mean(-1) @ self.backbone_proj

    def forward(self, pixels: Tensor) -> ImageFeatures:
        return self.encode(pixels)

"""Every backbone family runs end to end (small widths; the released sizes are checked by key layout)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from xdecoder import Predictor, build_model
from xdecoder.config import CONFIGS, DaViTConfig, FocalNetConfig, XDecoderConfig
from xdecoder.predictor import PredictorSettings

PARITY = CONFIGS["parity"]
SMALL = {
    "focal_dw": PARITY,
    "focal": dataclasses.replace(PARITY, name="small-focal",
                                 backbone=FocalNetConfig("focal", 32, (1, 1, 2, 1), (4, 4, 4, 4))),
    "davit": dataclasses.replace(PARITY, name="small-davit", backbone=DaViTConfig(
        dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), heads=(2, 2, 4, 4), groups=(2, 2, 4, 4),
        patch_size=(7, 3, 3, 3), patch_stride=(4, 2, 2, 2), patch_padding=(3, 1, 1, 1),
        patch_prenorm=(False, True, True, True))),
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_family_runs_every_task(family: str) -> None:
    torch.manual_seed(0)
    cfg: XDecoderConfig = SMALL[family]
    model = build_model(cfg)
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=96, caption_steps=3))
    image = (np.random.default_rng(1).random((100, 150, 3)) * 255).astype(np.uint8)  # 96x144: pads to 96x160
    features = predictor.encode(image)
    res = features.images[0].res5
    assert res.shape == (1, cfg.backbone_dim, 3, 5)
    semantic = predictor.semantic(features, ["cat", "dog"], return_scores=True)[0]
    assert semantic.scores is not None and np.isfinite(semantic.scores).all()
    assert semantic.label_map.shape == (100, 150)
    assert predictor.ground(features, ["a cat"])[0][0].mask.shape == (100, 150)
    assert len(predictor.caption_ids(features)[0]) == 77
    assert np.isfinite(predictor.image_embeddings(features)).all()


def test_davit_window_padding_keeps_shapes() -> None:
    """DaViT pads feature maps to whole 7x7 windows and crops back (sizes not multiples of 7)."""
    from xdecoder.modeling.davit import DaViT

    davit = DaViT(SMALL["davit"].backbone).eval()  # type: ignore[arg-type]
    with torch.inference_mode():
        outs = davit(torch.randn(1, 3, 160, 224))
    assert [tuple(o.shape[-2:]) for o in outs.values()] == [(40, 56), (20, 28), (10, 14), (5, 7)]

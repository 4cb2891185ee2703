"""The opt-in int8 path of bench/model_speedups.py runs and keeps its stated agreement with float32 on
the bundled model (the README's table comes from that script; this keeps it from rotting)."""

from __future__ import annotations

import torch

from bench.model_speedups import agreement, captions, load, outputs, variant
from xdecoder import Predictor


def test_int8_linear_layers_agree_with_float32_on_the_bundled_model() -> None:
    torch.set_num_threads(1)
    model, settings, images, classes, stuff = load("bundled")
    images = images[:4]
    base, fast = (Predictor(m, device="cpu", settings=settings) for m in (model, variant(model, "int8")))
    ref, got = outputs(base, images, classes, stuff), outputs(fast, images, classes, stuff)
    agree = agreement(ref, got, captions(base, ref["features"]), captions(fast, got["features"]))
    # Quantized weights move logits a little: a few boundary pixels may flip, nothing more.
    assert agree["label map"] >= 0.99 and agree["panoptic map"] >= 0.99, agree
    assert agree["embedding cos"] > 0.999 and agree["captions equal"] == 1.0, agree
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in fast.model.modules())

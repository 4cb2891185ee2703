"""Training: the loss falls on synthetic scenes, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xdecoder import build_model
from xdecoder.training.trainer import TrainConfig, Trainer, synthetic_batches

SIZE = (96, 64)


def test_loss_falls_in_a_few_steps() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=16, batch_size=2, lr=1e-3, warmup=2, num_points=256)
    history = Trainer(build_model("parity"), cfg).fit(synthetic_batches(cfg, SIZE))
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses
    for part in ("cls", "mask", "dice", "grounding", "caption", "retrieval"):
        assert np.isfinite([h[part] for h in history]).all(), part


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=1, lr=1e-3, warmup=1, num_points=128, checkpoint_every=2)
    torch.manual_seed(0)
    straight = Trainer(build_model("parity"), cfg)
    straight.fit(synthetic_batches(cfg, SIZE))
    # A run that stops after step 2 (as a kill would, after its checkpoint) and a fresh process resuming.
    torch.manual_seed(0)
    first = Trainer(build_model("parity"), cfg)
    first.fit(synthetic_batches(cfg, SIZE), folder=tmp_path / "ckpt", until=2)
    torch.manual_seed(1)  # the resumed process starts from other random weights: all must come from disk
    resumed = Trainer(build_model("parity"), cfg)
    assert resumed.resume(tmp_path / "ckpt") and resumed.step == 2
    resumed.fit(synthetic_batches(cfg, SIZE), folder=tmp_path / "ckpt")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

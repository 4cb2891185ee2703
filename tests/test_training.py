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


def test_metrics_are_right_on_known_answers() -> None:
    import numpy as np

    from xdecoder.training.evaluate import bleu4, panoptic_quality, recall_at_1
    from xdecoder.training.synthetic import make_scene

    assert bleu4(["a red circle on grass"], ["a red circle on grass"]) == 1.0
    assert bleu4(["blue squares"], ["a red circle on grass"]) == 0.0
    assert 0 < bleu4(["a red circle on sand"], ["a red circle on grass"]) < 1
    scene = make_scene(5)
    stats: dict[int, list[float]] = {}
    panoptic_quality(scene.segment_map, {s.id: s.category_id for s in scene.segments}, scene, stats)
    assert all(s[0] == s[1] and s[2] == s[3] == 0 for s in stats.values())  # perfect: PQ 1 for every class
    # Captions 0 and 1 are the same text: both queries pick image 0, so query 1 misses its own image but
    # finds one it describes; query 2 picks image 1, a wrong description.
    scores = np.array([[0.9, 0.9, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 0.2]])
    assert recall_at_1(scores, ["a red circle", "a red circle", "a blue square"]) == (1 / 3, 2 / 3)


def test_train_and_eval_commands(tmp_path: Path) -> None:
    """xdlabel train writes a checkpoint (resumed when rerun) that xdlabel eval loads and scores."""
    import json
    import os
    import subprocess
    import sys

    def cli(*args: str) -> dict[str, float]:
        r = subprocess.run([sys.executable, "-m", "xdlabel.cli", *args], capture_output=True, text=True,
                           timeout=600, env=os.environ)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    size = ["--width", "96", "--height", "64"]
    out = str(tmp_path / "ckpt")
    first = cli("train", "--out", out, "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1", "--json", *size)
    assert first["steps"] == 2
    second = cli("train", "--out", out, "--steps", "3", "--batch-size", "1", "--json", *size)
    assert second["steps"] == 3 and second["resumed_from_step"] == 2
    metrics = cli("eval", "--checkpoint", str(tmp_path / "ckpt" / "model.safetensors"), "--scenes", "2", "--json",
                  *size)
    summary = {k for k in metrics if "/" not in k}
    assert summary == {"miou", "pq", "referring_iou", "r_at_1", "r_at_1_caption", "caption_exact", "bleu4"}
    assert {k.split("/")[0] for k in metrics if "/" in k} == {"iou"}  # per-class IoU of the classes present
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # Same seed, same run, in another process: initial weights included (what make train-demo relies on).
    again = str(tmp_path / "again")
    cli("train", "--out", again, "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1", "--json", *size)
    cli("train", "--out", again, "--steps", "3", "--batch-size", "1", "--json", *size)
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("ckpt", "again")]
    assert weights[0] == weights[1]


def test_near_miss_negatives_and_no_object_weight_change_the_losses() -> None:
    from xdecoder.training.losses import LossWeights, retrieval_loss

    # Retrieval: a negative caption identical to an image's own caption must raise that image's loss
    # (it competes with the right answer); a negative far from every image changes it little.
    torch.manual_seed(0)
    images, texts = torch.randn(4, 16), torch.randn(4, 16)
    scale, weights = torch.tensor(2.0), LossWeights()
    base = retrieval_loss([images], texts, scale, weights)
    assert retrieval_loss([images], texts, scale, weights, negatives=texts[:1].clone()) > base + 0.05
    far = -images.mean(0, keepdim=True)
    assert retrieval_loss([images], texts, scale, weights, negatives=far) < base + 0.05
    # The no-object weight reaches the trainer's class loss: same batch, same weights, other value.
    cfg = TrainConfig(steps=1, batch_size=1, num_points=64, near_misses=2)
    batch = synthetic_batches(cfg, SIZE)(0)
    parts = []
    for no_object in (0.1, 0.4):
        torch.manual_seed(0)
        options = {**cfg.__dict__, "weights": LossWeights(no_object=no_object)}
        trainer = Trainer(build_model("parity"), TrainConfig(**options))
        with torch.no_grad():
            parts.append(trainer.losses(batch))
    assert not torch.isclose(parts[0]["cls"], parts[1]["cls"])
    assert torch.isfinite(parts[0]["retrieval"]) and torch.isclose(parts[0]["retrieval"], parts[1]["retrieval"])


def test_name_separation_pulls_collapsed_class_names_apart() -> None:
    """A text encoder trained from nothing can map look-alike class names onto one embedding (the
    bundled model's circle, square and triangle sit at cosines of 0.99-1.00). The name-separation term,
    alone, for 20 steps of random template pairs, must pull the closest pair of names apart."""
    import random

    import torch.nn.functional as F

    from xdecoder.training.losses import LossWeights, name_separation_loss
    from xdecoder.training.synthetic import CLASSES
    from xdecoder.training.trainer import random_prompts

    torch.manual_seed(0)
    model = build_model("parity")
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=1, num_points=64, weights=LossWeights(names=1.0)))
    names, rng = [*CLASSES, "background"], random.Random(0)

    def closest_pair() -> float:
        with torch.no_grad():
            e = F.normalize(trainer._texts([f"a photo of a {n}." for n in names])[1], dim=-1)
        return float((e @ e.t() - 2 * torch.eye(len(names))).max())

    before = closest_pair()
    optimizer = torch.optim.Adam(model.language.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        first, second = random_prompts(names, rng), random_prompts(names, rng)
        loss = name_separation_loss(trainer._texts(first)[1], trainer._texts(second)[1],
                                    model.language.logit_scale, trainer.cfg.weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = closest_pair()
    print(f"\nclosest class-name cosine {before:.3f} -> {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert after < before - 0.1 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # The trainer adds the term only when asked (official training has none).
    batch = synthetic_batches(trainer.cfg, SIZE)(0)
    with torch.no_grad():
        assert "names" in trainer.losses(batch)
        plain = Trainer(build_model("parity"), TrainConfig(steps=1, batch_size=1, num_points=64))
        assert "names" not in plain.losses(batch)


def test_size_jitter_draws_padded_and_portrait_batches_and_replays() -> None:
    """300 training steps with widths 128-240 and a 0.2 portrait chance: every batch shares one size in
    range, widths that need padding to a multiple of 32 and ones that do not both occur, the portrait
    share is binomial-plausible (300 draws: 0.12-0.28), and a step replays to the same scenes. Without
    jitter the batches are the generator's scenes at the given size."""
    from xdecoder.training.synthetic import make_scene

    cfg = TrainConfig(batch_size=2, seed=9, min_width=128, portrait=0.2)
    batches = synthetic_batches(cfg, (240, 128))
    shapes = []
    for step in range(300):
        sizes = {s.image.shape[:2] for s in batches(step)}
        assert len(sizes) == 1
        (h, w), = sizes
        assert min(h, w) == 128 and 128 <= max(h, w) <= 240
        shapes.append((h, w))
    longs = [max(s) for s in shapes]
    assert any(n % 32 for n in longs) and any(n % 32 == 0 for n in longs)
    assert 0.12 <= np.mean([h > w for h, w in shapes]) <= 0.28
    assert all(np.array_equal(a.image, b.image) for a, b in zip(batches(17), batches(17), strict=True))
    fixed = synthetic_batches(TrainConfig(batch_size=2, seed=9), (240, 128))(5)
    assert all(np.array_equal(s.image, make_scene(9 * 10_000_019 + 10 + i, (240, 128)).image)
               for i, s in enumerate(fixed))

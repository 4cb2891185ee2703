"""Post-processing memory is bounded by the output, not by queries x pixels.

Each size runs in a fresh process (the parity model, a random-noise photo, short side 160); before each
task the peak RSS (VmHWM) is reset to the current RSS, so a task's peak extra memory is its own: torch's
allocations included, which tracemalloc would not see. Measured on the shared 2-core CI machine:

- 4000x3000 (12 MP): instance +0.30 GB, of which 0.15 GB are the 100 returned masks, packed (asserted: at
  most 0.4 GB past the output); ground +0.18 GB; 20 regions +0.20 GB; the one-pass ingest path +0.20 GB
  (asserted: each at most 1 GB);
- 2000x1500 (3 MP): semantic +0.25 GB, panoptic +0.21 GB (asserted: at most 0.4 GB; the fixed-size chunk
  of upsampled masks and its temporaries do not shrink with the image).

Before, instance segmentation of a 12 MP photo took +17.7 GB. Semantic and panoptic run at 3 MP to keep
the test near a minute. 8000x6000 (48 MP) takes ~7 minutes here, so it is run by hand, not in CI:
``python -m tests.test_memory 8000 6000 semantic,panoptic,instance,ground,regions,one-pass`` prints each
task's peak extra bytes ("extra"), returned bytes ("output") and seconds.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
CLASSES = ["person", "dog", "car", "sky", "grass"]


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                if line.startswith(("VmRSS", "VmHWM"))}


def _nbytes(value: object) -> int:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return _nbytes(list(vars(value).values()))
    return 0


def _measure(width: int, height: int, tasks: list[str]) -> dict[str, dict[str, float]]:
    """In this process: {task: {"extra": peak RSS growth, "output": bytes of the returned arrays}}."""
    import numpy as np
    import torch

    from tests.conftest import PARITY
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.predictor import PredictorSettings

    torch.manual_seed(0)
    model = build_model("parity")
    load_checkpoint(model, PARITY / "reduced_weights.safetensors")
    # Every query may be a region, so the region path returns its 20 masks.
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=160, region_min_score=0.0,
                                                                                  caption_steps=2))
    photo = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    features = predictor.encode(photo)
    predictor.class_embeddings(CLASSES)
    predictor.class_embeddings(predictor.settings.region_vocabulary)
    def one_pass() -> object:  # what ingest asks of each image, the encode included
        again = predictor.encode(photo)
        return (predictor.image_embeddings(again), predictor.region_embeddings(again), predictor.caption(again))

    runs = {"semantic": lambda: predictor.semantic(features, CLASSES),
            "panoptic": lambda: predictor.panoptic(features, CLASSES, stuff=["sky"]),
            "instance": lambda: predictor.instance(features, CLASSES),
            "ground": lambda: predictor.ground(features, ["a dog", "the sky"]),
            "regions": lambda: predictor.region_embeddings(features),
            "one-pass": one_pass}
    out = {}
    for task in tasks:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: RSS is what is live
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before, start = _status()["VmRSS"], time.perf_counter()
        result = runs[task]()
        out[task] = {"extra": _status()["VmHWM"] - before, "output": _nbytes(result),
                     "seconds": round(time.perf_counter() - start, 1)}
        del result
    return out


def _run(width: int, height: int, tasks: list[str]) -> dict[str, dict[str, float]]:
    proc = subprocess.run([sys.executable, "-m", "tests.test_memory", str(width), str(height), ",".join(tasks)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_row_bands_equal_the_full_resize() -> None:
    """Large images are post-processed a band of rows at a time (postprocess.MaskUpsampler). 12 seeded random
    cases (random low-res logits, sizes, scale factors and a budget small enough for 2-40 bands): banded
    logits equal the full bicubic resize within 1e-5; semantic and panoptic maps and segments equal the
    full-image ones except at pixels whose two best candidates are within 1e-5 (float order); binary masks made
    and packed band by band (one full-size float mask past the budget) equal the full ones but at |logit| <= 1e-4."""
    import torch

    from xdecoder.postprocess import (
        MaskUpsampler,
        binary_masks,
        panoptic_segments,
        semantic_labels,
        semantic_scores,
    )

    rng = np.random.default_rng(5)
    for trial in range(12):
        q, k = int(rng.integers(5, 40)), int(rng.integers(2, 8))
        h4, w4 = (int(v) for v in rng.integers(6, 30, 2))
        padded = (h4 * 4, w4 * 4)
        resized = (padded[0] - int(rng.integers(0, 20)), padded[1] - int(rng.integers(0, 20)))
        original = (int(resized[0] * rng.uniform(0.7, 6)), int(resized[1] * rng.uniform(0.7, 6)))
        low = torch.from_numpy(rng.normal(0, 4, (q, h4, w4)).astype(np.float32))
        logits = torch.from_numpy(rng.normal(0, 3, (q, k + 1)).astype(np.float32))
        full = MaskUpsampler(low, padded, resized, original)
        budget = 4 * original[1] * (16 + k) * int(rng.integers(max(1, original[0] // 40), max(2, original[0] // 2)))
        banded = MaskUpsampler(low, padded, resized, original, budget=budget)
        assert 2 <= len(banded.bands(16 + k)), trial
        every = torch.arange(q)
        reference = full(every)
        rows = torch.cat([torch.cat([c for _, c in banded.chunks(every, band)]) for band in banded.bands(1)], 1)
        assert (rows - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max())), trial
        scores = semantic_scores(logits, full)
        top2 = scores.topk(2, 0).values
        sure = (top2[0] - top2[1]) > 1e-5
        best, label = semantic_labels(logits, banded)
        assert torch.equal(label[sure], scores.argmax(0)[sure]), trial
        assert torch.allclose(best, top2[0], atol=1e-5)
        assert torch.allclose(semantic_scores(logits, banded), scores, atol=1e-5)
        expected, expected_infos = panoptic_segments(logits, full, {0}, object_mask_threshold=0.3,
                                                     overlap_threshold=0.5)
        got, infos = panoptic_segments(logits, banded, {0}, object_mask_threshold=0.3, overlap_threshold=0.5)
        s, lab = logits.softmax(-1).max(-1)
        kept = (lab.ne(k) & (s > 0.3)).nonzero().flatten()
        if kept.numel() >= 2:
            prob = s[kept].view(-1, 1, 1) * reference[kept].sigmoid()
            t2 = prob.topk(2, 0).values
            near = ((t2[0] - t2[1]) <= 1e-5) | ((reference[kept] - 0).abs() <= 1e-4).any(0)
            assert not ((got != expected) & ~near).any(), trial
        assert [(i.id, i.category_id, i.query) for i in infos] == \
            [(i.id, i.category_id, i.query) for i in expected_infos], trial
        # masks past one full-size float mask: made and packed a band of rows at a time
        rows_only = MaskUpsampler(low, padded, resized, original, budget=4 * original[1] * (original[0] // 3))
        for (mask, score), (want, want_score), logit in zip(binary_masks(rows_only, every), binary_masks(full, every),
                                                          reference, strict=True):
            differ = mask.dense() != want.dense()
            assert not (differ & (logit.abs() > 1e-4).numpy()).any(), trial
            assert abs(float(score) - float(want_score)) <= 1e-4, trial
            assert differ.any() or (mask.box, mask.area) == (want.box, want.area)


pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def test_every_task_on_a_12_megapixel_photo_stays_within_its_bound() -> None:
    m = _run(4000, 3000, ["instance", "ground", "regions", "one-pass"])
    print("\n12 MP:", {k: (round(v["extra"] / GB, 3), round(v["output"] / GB, 3)) for k, v in m.items()})
    assert m["instance"]["output"] >= 100 * 12e6 / 8 * 0.5  # 100 masks came back, packed (half the image each)
    assert m["instance"]["extra"] - m["instance"]["output"] <= 0.4 * GB
    assert m["regions"]["output"] >= 20 * 12e6 / 8 * 0.5
    for task in ("instance", "ground", "regions", "one-pass"):
        assert m[task]["extra"] <= 1 * GB, task


def test_semantic_and_panoptic_on_a_3_megapixel_photo() -> None:
    m = _run(2000, 1500, ["semantic", "panoptic"])
    print("\n3 MP:", {k: (round(v["extra"] / GB, 3), round(v["output"] / GB, 3)) for k, v in m.items()})
    for task in ("semantic", "panoptic"):
        assert m[task]["extra"] <= 0.4 * GB, task


if __name__ == "__main__":
    print(json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","))))

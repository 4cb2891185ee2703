"""Post-processing memory is bounded by the output, not by queries x pixels.

Each size runs in a fresh process (the parity model, a random-noise photo, short side 160); before each
task the peak RSS (VmHWM) is reset to the current RSS, so a task's peak extra memory is its own: torch's
allocations included, which tracemalloc would not see. Measured on the shared 2-core CI machine:

- 4000x3000 (12 MP): instance +1.34 GB, of which 1.2 GB are the 100 returned masks (asserted: at most
  0.4 GB past the output); ground +0.13 to +0.15 GB; 20 regions +0.30 GB (asserted: each at most 1 GB);
- 2000x1500 (3 MP): semantic +0.19 GB, panoptic +0.20 to +0.27 GB over runs (asserted: at most 0.4 GB;
  the fixed-size chunk of upsampled masks and its temporaries do not shrink with the image).

Before, instance segmentation of a 12 MP photo took +17.7 GB. Semantic and panoptic run at 3 MP to keep
the test near a minute (by hand at 12 MP: +0.53 and +0.62 GB, ~30 and ~12 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _measure(width: int, height: int, tasks: list[str]) -> dict[str, dict[str, int]]:
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
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=160, region_min_score=0.0))
    photo = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    features = predictor.encode(photo)
    predictor.class_embeddings(CLASSES)
    predictor.class_embeddings(predictor.settings.region_vocabulary)
    runs = {"semantic": lambda: predictor.semantic(features, CLASSES),
            "panoptic": lambda: predictor.panoptic(features, CLASSES, stuff=["sky"]),
            "instance": lambda: predictor.instance(features, CLASSES),
            "ground": lambda: predictor.ground(features, ["a dog", "the sky"]),
            "regions": lambda: predictor.region_embeddings(features)}
    out = {}
    for task in tasks:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _status()["VmRSS"]
        result = runs[task]()
        out[task] = {"extra": _status()["VmHWM"] - before, "output": _nbytes(result)}
        del result
    return out


def _run(width: int, height: int, tasks: list[str]) -> dict[str, dict[str, int]]:
    proc = subprocess.run([sys.executable, "-m", "tests.test_memory", str(width), str(height), ",".join(tasks)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def test_every_task_on_a_12_megapixel_photo_stays_within_its_bound() -> None:
    m = _run(4000, 3000, ["instance", "ground", "regions"])
    print("\n12 MP:", {k: (round(v["extra"] / GB, 3), round(v["output"] / GB, 3)) for k, v in m.items()})
    assert m["instance"]["output"] >= 100 * 12e6  # 100 dense masks came back
    assert m["instance"]["extra"] - m["instance"]["output"] <= 0.4 * GB
    assert m["regions"]["output"] >= 20 * 12e6
    for task in ("ground", "regions"):
        assert m[task]["extra"] <= 1 * GB, task


def test_semantic_and_panoptic_on_a_3_megapixel_photo() -> None:
    m = _run(2000, 1500, ["semantic", "panoptic"])
    print("\n3 MP:", {k: (round(v["extra"] / GB, 3), round(v["output"] / GB, 3)) for k, v in m.items()})
    for task in ("semantic", "panoptic"):
        assert m[task]["extra"] <= 0.4 * GB, task


if __name__ == "__main__":
    print(json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","))))

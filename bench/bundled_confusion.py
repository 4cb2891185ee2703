"""Where a synthetic-scene model's semantic errors come from: which class each ground-truth pixel gets,
and how far apart the model puts the class names' embeddings (names at cosine ~1 cannot be told apart by
any image). Defaults: the bundled model, 30 scenes of the validation seed (777) at its training size.

    python bench/bundled_confusion.py [--checkpoint PATH] [--scenes 30] [--seed 777]

Any checkpoint of the parity configuration, e.g. the 96x64 second stage bundled before, kept in git history:
    git show afda387:xdlabel/models/shapes.safetensors > /tmp/stage2.safetensors
    python bench/bundled_confusion.py --checkpoint /tmp/stage2.safetensors --width 96 --height 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xdecoder import Predictor, build_model, load_checkpoint  # noqa: E402
from xdecoder.predictor import PredictorSettings  # noqa: E402
from xdecoder.training.synthetic import CLASSES, make_scenes  # noqa: E402
from xdlabel.settings import BUNDLED_CHECKPOINT  # noqa: E402


def main() -> None:
    meta = json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--width", type=int, default=meta["train_size"][0])
    parser.add_argument("--height", type=int, default=meta["train_size"][1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(meta["config"])
    load_checkpoint(model, args.checkpoint)
    pred = Predictor(model, device="cpu", settings=PredictorSettings(short_side=args.height))
    names = list(CLASSES)
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    with torch.inference_mode():
        for scene in make_scenes(args.scenes, seed=args.seed, size=(args.width, args.height)):
            label = pred.semantic(pred.encode(scene.image), names)[0].label_map
            truth = np.zeros_like(label)
            for seg in scene.segments:
                truth[scene.mask(seg.id)] = seg.category_id
            np.add.at(confusion, (truth.ravel(), label.ravel()), 1)
        e = torch.nn.functional.normalize(pred.class_embeddings(names), dim=-1)
        cosine = (e @ e.t()).numpy()
    width = max(map(len, names))
    print(f"pixels of each true class (rows) by predicted class (columns), {args.scenes} scenes of seed {args.seed}:")
    print(" " * width, *(f"{n:>9}" for n in names), "  recall")
    recall = confusion.diagonal() / np.maximum(1, confusion.sum(1))
    for i, n in enumerate(names):
        print(f"{n:>{width}}", *(f"{v:9d}" for v in confusion[i]), f"  {recall[i]:.2f}")
    print("\ncosine between the class names' embeddings (the 81-template average the predictor uses):")
    print(" " * width, *(f"{n:>9}" for n in names))
    for i, n in enumerate(names):
        print(f"{n:>{width}}", *(f"{v:9.2f}" for v in cosine[i, : len(names)]))


if __name__ == "__main__":
    main()

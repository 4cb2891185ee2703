"""Does a model ground a shape in photos whose resized width needs padding? The ML backend tests' flat
640x480 scene (a red ball, a blue square that hides part of it for some seeds, grass under sky), drawn at
sizes that do (640x480 -> 170x128, padded to 192) and do not (576x384, 960x480) need padding at a short
side of 128; 'the red circle' is grounded and its IoU with the ball printed per size, over twelve seeds.

    python bench/padded_photos.py [--checkpoint PATH ...] [--short-side 128] [--seeds 12]

Stage 4, bundled before the model trained on padded sizes, is kept in git history:
    git show c8190be:xdlabel/models/shapes.safetensors > /tmp/stage4.safetensors
    python bench/padded_photos.py --checkpoint /tmp/stage4.safetensors xdlabel/models/shapes.safetensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_mlbackend_interactive import _scene_image, ball_iou  # noqa: E402
from xdecoder import Predictor, build_model, load_checkpoint  # noqa: E402
from xdecoder.predictor import PredictorSettings  # noqa: E402
from xdecoder.transforms import resized_shape  # noqa: E402
from xdlabel.settings import BUNDLED_CHECKPOINT  # noqa: E402

SIZES = ((640, 480), (576, 384), (960, 480))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=[str(BUNDLED_CHECKPOINT)])
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=12)
    args = parser.parse_args()
    print(f"'the red circle' IoU with the ball, {args.seeds} seeds, short side {args.short_side}")
    print(f"{'checkpoint':<40} {'photo':>8} {'resized':>8} {'padded to':>10} {'min':>5} {'mean':>5}  per seed")
    with tempfile.TemporaryDirectory() as folder:
        for checkpoint in args.checkpoint:
            model = build_model("parity")
            load_checkpoint(model, checkpoint)
            predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=args.short_side))
            for width, height in SIZES:
                ious = []
                for seed in range(args.seeds):
                    path = Path(folder) / f"{seed}-{width}x{height}.png"
                    _scene_image(path, seed, width, height)
                    image = Image.open(path).convert("RGB")
                    mask = predictor.ground(predictor.encode(image), ["the red circle"])[0][0].mask
                    ious.append(ball_iou(mask, path))
                h, w = resized_shape(height, width, args.short_side, None)
                print(f"{Path(checkpoint).name[-40:]:<40} {width}x{height:<4} {w}x{h:<4} "
                      f"{-(-w // 32) * 32}x{-(-h // 32) * 32:<5} {min(ious):5.2f} {np.mean(ious):5.2f}  "
                      + " ".join(f"{v:.2f}" for v in ious))


if __name__ == "__main__":
    main()

"""Text -> image R@1 of a model at each weight of the decoder embedding in the retrieval score
(w*cos(decoder, text) + (1-w)*cos(backbone, text); 0.5 is the official score), on validation draws
of the synthetic scenes (the held-out seed 12345 only with --heldout, once a weight is chosen). Each
draw is encoded once; every weight reads the same image vectors, as a running index would.

    python bench/retrieval_weight.py [--checkpoint PATH ...] [--seeds 777 778 779] [--heldout]

Prints R@1 as "the query's own scene first" and, after the slash, "a scene with the query's caption
first" (the draws repeat captions; see README), per seed and their mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xdecoder import Predictor, build_model, load_checkpoint  # noqa: E402
from xdecoder.predictor import PredictorSettings  # noqa: E402
from xdecoder.training.evaluate import recall_at_1  # noqa: E402
from xdecoder.training.synthetic import make_scenes  # noqa: E402
from xdlabel.settings import BUNDLED_CHECKPOINT, bundled_meta  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=[str(BUNDLED_CHECKPOINT)])
    parser.add_argument("--seeds", type=int, nargs="+", default=[777, 778, 779])
    parser.add_argument("--heldout", action="store_true", help="add the held-out draw (seed 12345)")
    parser.add_argument("--scenes", type=int, default=100)
    args = parser.parse_args()
    meta = bundled_meta()
    seeds = [*args.seeds, *([12345] if args.heldout else [])]
    settings = PredictorSettings(short_side=meta["short_side"], caption_steps=meta["caption_steps"])
    print(f"text -> image R@1, own scene / caption, {args.scenes} scenes of {tuple(meta['train_size'])} per seed")
    print(f"{'checkpoint':<28} {'w':>5} " + " ".join(f"{'seed ' + str(s):>11}" for s in seeds)
          + f" {'mean ' + '+'.join(map(str, args.seeds)):>16}")
    for checkpoint in args.checkpoint:
        model = build_model(meta["config"])
        load_checkpoint(model, checkpoint)
        encoded = {}
        reader = Predictor(model, device="cpu", settings=settings)
        for seed in seeds:
            scenes = make_scenes(args.scenes, seed=seed, size=tuple(meta["train_size"]))
            vectors = np.stack([reader.image_embeddings(reader.encode(s.image))[0] for s in scenes])
            encoded[seed] = (vectors, [s.caption for s in scenes])
        for w in WEIGHTS:
            weighted = dataclasses.replace(settings, retrieval_decoder_weight=w)
            predictor = Predictor(model, device="cpu", settings=weighted)
            cells = {seed: recall_at_1(v @ predictor.text_query_embeddings(q).T, q) for seed, (v, q) in encoded.items()}
            mean = np.mean([cells[s] for s in args.seeds], axis=0)
            print(f"{Path(checkpoint).name[-28:]:<28} {w:5.2f} "
                  + " ".join(f"{own:5.2f}/{cap:.2f}" for own, cap in cells.values())
                  + f" {mean[0]:10.3f}/{mean[1]:.3f}")


if __name__ == "__main__":
    main()

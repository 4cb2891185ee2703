"""Images/s and per-stage time of X-Decoder on this machine: one shared pass vs. three naive passes.

(a) shared: ``Predictor.encode`` once per batch (backbone, pixel decoder, one decoder pass), then
    semantic + panoptic for a class list (cached class embeddings), the retrieval embedding and
    region embeddings from that pass, and greedy captions on the growing prefix over the
    cached latent queries.
(b) naive: what a user of the official code runs for the same three answers: a segmentation
    forward, a retrieval forward, and a captioning forward (backbone + pixel decoder, then 50
    greedy steps that each re-run the 77-token text encoder and the full decoder over 101+77
    queries, batch-parallel as ``evaluate_captioning`` does).
Same weights (random: timing only), same images, same class embeddings, float32, CPU threads as
set. Prints a table; not a test.

    python bench/model.py [--config focalt] [--short-side 512] [--batch-sizes 1 4]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from xdecoder import Predictor, build_model
from xdecoder.modeling.xdecoder import XDecoder
from xdecoder.predictor import PredictorSettings
from xdecoder.tokenizer import BOS_ID
from xdecoder.transforms import resize

CLASSES = ["person", "dog", "cat", "car", "bicycle", "tree", "sky", "grass", "road", "building"]


class StageClock:
    """Wall time per model stage, from forward pre/post hooks, plus named blocks."""

    def __init__(self, model: XDecoder) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        stages = {"backbone": model.backbone, "pixel decoder": model.sem_seg_head.pixel_decoder,
                  "decoder (seg pass)": model.decoder, "text encoder": model.language}
        for name, module in stages.items():
            module.register_forward_pre_hook(lambda *_, n=name: self._start.__setitem__(n, time.perf_counter()))
            module.register_forward_hook(lambda *_, n=name: self._stop(n))

    def _stop(self, name: str) -> None:
        self.totals[name] += time.perf_counter() - self._start.pop(name)

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals.clear()


def shared_pass(predictor: Predictor, images: list[np.ndarray], clock: StageClock) -> None:
    with clock.block("total"):
        features = predictor.encode(images)
        with clock.block("post-processing"):
            predictor.semantic(features, CLASSES)
            predictor.panoptic(features, CLASSES, stuff=CLASSES[5:])
            predictor.image_embeddings(features)
            predictor.region_embeddings(features)
        with clock.block("captioning"):
            predictor.caption_ids(features)


def naive_passes(predictor: Predictor, images: list[np.ndarray], clock: StageClock, steps: int) -> None:
    model = predictor.model
    with clock.block("total"):
        features = predictor.encode(images)  # 1. segmentation forward
        with clock.block("post-processing"):
            predictor.semantic(features, CLASSES)
            predictor.panoptic(features, CLASSES, stuff=CLASSES[5:])
        features = predictor.encode(images)  # 2. retrieval forward
        with clock.block("post-processing"):
            predictor.image_embeddings(features)
            predictor.region_embeddings(features)
        # 3. captioning forward, as the official evaluate_captioning runs it.
        with clock.block("captioning"), torch.inference_mode():
            pixels = torch.stack([model.normalize(torch.from_numpy(im).permute(2, 0, 1)) for im in images])
            pixels = torch.nn.functional.pad(pixels, (0, -pixels.shape[-1] % 32, 0, -pixels.shape[-2] % 32))
            pix = model.sem_seg_head.pixel_decoder(model.backbone(pixels))
            decoder = model.decoder
            mem = decoder.memory(pix.multi_scale_features)
            ids = torch.full((len(images), 77), BOS_ID, dtype=torch.int64)
            vocab = model.language.lang_encoder.token_embedding.weight
            for step in range(steps):
                token_emb, _ = model.language(ids)
                feats = decoder.caption_features(mem, pix.mask_features, token_emb)
                ids[:, step + 1] = (feats[:, step] @ vocab.t()).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="focalt")
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.config)
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=args.short_side))
    steps = model.config.decoder.captioning_steps
    rng = np.random.default_rng(0)
    # 4:3 photos; resized to the short side inside both paths.
    images = [(rng.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(max(args.batch_sizes))]
    resized = [resize(im, args.short_side) for im in images]
    clock = StageClock(model)
    with clock.block("class embeddings (cold)"):
        predictor.class_embeddings(CLASSES)
    cold_text = clock.totals["class embeddings (cold)"]
    shared_pass(predictor, images[:1], clock)  # warm-up
    rows: dict[str, dict[str, float]] = {}
    for bs in args.batch_sizes:
        for name, run in (("(a) shared", lambda b: shared_pass(predictor, images[:b], clock)),
                          ("(b) naive", lambda b: naive_passes(predictor, resized[:b], clock, steps))):
            clock.reset()
            run(bs)
            rows[f"{name} b{bs}"] = {k: v / bs for k, v in clock.totals.items()}
    stages = ["backbone", "pixel decoder", "decoder (seg pass)", "text encoder", "post-processing",
              "captioning", "total"]
    print(f"\nX-Decoder {args.config}, random weights, 640x480 -> short side {args.short_side}, "
          f"{torch.get_num_threads()} threads, {len(CLASSES)} classes, {steps} caption steps")
    print("seconds per image (stages overlap: captioning includes its own text-encoder/backbone time)")
    header = f"{'stage':<22}" + "".join(f"{k:>16}" for k in rows)
    print(header)
    print("-" * len(header))
    for stage in stages:
        print(f"{stage:<22}" + "".join(f"{r.get(stage, 0.0):>16.3f}" for r in rows.values()))
    print(f"{'images/s':<22}" + "".join(f"{1 / r['total']:>16.3f}" for r in rows.values()))
    for bs in args.batch_sizes:
        a, b = rows[f"(a) shared b{bs}"]["total"], rows[f"(b) naive b{bs}"]["total"]
        print(f"batch {bs}: shared pass is {b / a:.1f}x the naive throughput")
    print(f"class embeddings, cold ({len(CLASSES)} names x 81 templates): {cold_text:.2f}s once, then cached")


if __name__ == "__main__":
    main()

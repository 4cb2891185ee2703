"""Opt-in CPU speed-ups measured against float32: dynamic int8 quantization of the linear layers
(``torch.ao.quantization.quantize_dynamic``) and ``torch.compile`` of the encode, on the parity model
(the golden weights) and the bundled model (its own scenes, size and caption steps).

Per variant: seconds per image for the bulk workload (encode + image embedding + region embeddings +
panoptic) and for captions, each the median of ``--repeats`` runs alternating with float32's (this
machine is shared, so single runs are noise), and agreement with float32 on the same images:
semantic label-map pixels equal, panoptic segment-map pixels equal, the lowest image-embedding
cosine, and how many images' caption ids are identical. Prints a table; not a test.

    python bench/model_speedups.py [--models parity bundled] [--variants int8 compile] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xdecoder import Predictor, build_model, load_checkpoint
from xdecoder.modeling.xdecoder import XDecoder
from xdecoder.predictor import Features, PredictorSettings
from xdecoder.training.synthetic import make_scenes
from xdlabel.settings import BUNDLED_CHECKPOINT, bundled_meta

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"
PARITY_CLASSES = ["person", "dog", "cat", "car", "bicycle", "tree", "sky", "grass", "road", "building"]


def load(name: str) -> tuple[XDecoder, PredictorSettings, list[np.ndarray], list[str], list[str]]:
    """(model, settings, images, classes, stuff) of ``parity`` or ``bundled``."""
    torch.manual_seed(0)
    if name == "parity":
        model = build_model("parity")
        load_checkpoint(model, str(PARITY / "reduced_weights.safetensors"))
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(PARITY.glob("image*.png"))]
        rng = np.random.default_rng(0)
        images += [(rng.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(2)]
        return model, PredictorSettings(short_side=512, caption_steps=50), images, PARITY_CLASSES, PARITY_CLASSES[5:]
    meta = bundled_meta()
    model = build_model(meta["config"])
    load_checkpoint(model, str(BUNDLED_CHECKPOINT))
    images = [scene.image for scene in make_scenes(8, seed=123, size=tuple(meta["train_size"]))]
    return (model, PredictorSettings(short_side=meta["short_side"], caption_steps=meta["caption_steps"]), images,
            list(meta["classes"]), list(meta["stuff"]))


def variant(model: XDecoder, kind: str) -> XDecoder:
    """A copy of ``model`` with the speed-up applied (int8: Linear layers; compile: the encode)."""
    out = copy.deepcopy(model)
    if "int8" in kind:
        with warnings.catch_warnings():  # the eager-mode API is deprecated but still the one for CPU Linear
            warnings.simplefilter("ignore")
            out = torch.ao.quantization.quantize_dynamic(out, {torch.nn.Linear}, dtype=torch.qint8)
    if "compile" in kind:
        out.encode = torch.compile(out.encode, dynamic=False)  # type: ignore[method-assign]
    return out


def outputs(p: Predictor, images: list[np.ndarray], classes: list[str], stuff: list[str]) -> dict[str, Any]:
    features = p.encode(images)
    return {"features": features, "embeddings": p.image_embeddings(features),
            "semantic": [r.label_map for r in p.semantic(features, classes)],
            "panoptic": [r.segment_map for r in p.panoptic(features, classes, stuff=stuff)],
            "regions": p.region_embeddings(features)}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bulk(p: Predictor, images: list[np.ndarray], classes: list[str], stuff: list[str]) -> None:
    for image in images:  # one at a time: the images differ in size
        outputs(p, [image], classes, stuff)


def captions(p: Predictor, features: Features) -> list[list[int]]:
    return p.caption_ids(features)


def agreement(ref: dict[str, Any], got: dict[str, Any], ref_ids: list[list[int]], ids: list[list[int]]
              ) -> dict[str, float]:
    def pixels(key: str) -> float:
        same = sum(int((a == b).sum()) for a, b in zip(ref[key], got[key], strict=True))
        return same / sum(a.size for a in ref[key])

    cos = (ref["embeddings"] * got["embeddings"]).sum(1) / (
        np.linalg.norm(ref["embeddings"], axis=1) * np.linalg.norm(got["embeddings"], axis=1))
    return {"label map": pixels("semantic"), "panoptic map": pixels("panoptic"), "embedding cos": float(cos.min()),
            "captions equal": sum(a == b for a, b in zip(ref_ids, ids, strict=True)) / len(ids),
            "regions": sum(len(r) for r in got["regions"]), "fp32 regions": sum(len(r) for r in ref["regions"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["parity", "bundled"], choices=["parity", "bundled"])
    parser.add_argument("--variants", nargs="+", default=["int8", "compile"],
                        choices=["int8", "compile", "int8+compile"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          "seconds per image, median of alternating runs; agreement with float32 on the same images")
    header = (f"{'model':<8} {'variant':<13} {'bulk s/img':>10} {'x fp32':>7} {'caption s/img':>13} {'x fp32':>7} "
              f"{'label map':>9} {'panoptic':>8} {'emb cos':>8} {'captions':>8} {'regions':>7} {'setup s':>7}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        model, settings, images, classes, stuff = load(name)
        base = Predictor(model, device="cpu", settings=settings)
        ref = outputs(base, images, classes, stuff)  # also warms the class-name embeddings
        ref_ids = captions(base, ref["features"])
        for kind in args.variants:
            start = time.perf_counter()
            fast = Predictor(variant(model, kind), device="cpu", settings=settings)
            got = outputs(fast, images, classes, stuff)  # compiles on first use
            ids = captions(fast, got["features"])
            setup = time.perf_counter() - start
            runs: dict[str, list[float]] = {"fp32": [], kind: [], "fp32 cap": [], f"{kind} cap": []}
            for _ in range(args.repeats):
                for label, p in (("fp32", base), (kind, fast)):
                    runs[label].append(timed(lambda p=p, i=images, c=classes, s=stuff: bulk(p, i, c, s)) / len(images))
                    features = p.encode(images)
                    runs[f"{label} cap"].append(timed(lambda p=p, f=features: captions(p, f)) / len(images))
            agree = agreement(ref, got, ref_ids, ids)
            med = {k: statistics.median(v) for k, v in runs.items()}
            for label, bulk_s, cap_s, row in (("fp32", med["fp32"], med["fp32 cap"], None),
                                              (kind, med[kind], med[f"{kind} cap"], agree)):
                if label == "fp32" and kind != args.variants[0]:
                    continue
                speed = f"{med['fp32'] / bulk_s:>7.2f} {cap_s:>13.3f} {med['fp32 cap'] / cap_s:>7.2f}"
                kept = f"{row['regions']:.0f}/{row['fp32 regions']:.0f}" if row else ""
                tail = (f"{row['label map']:>9.2%} {row['panoptic map']:>8.2%} {row['embedding cos']:>8.5f} "
                        f"{row['captions equal']:>8.0%} {kept:>7} {setup:>7.1f}") if row else \
                    f"{'-':>9} {'-':>8} {'-':>8} {'-':>8} {'-':>7} {'-':>7}"
                print(f"{name:<8} {label:<13} {bulk_s:>10.3f} {speed} {tail}")
    print("regions: regions kept by the variant / by float32; setup: copy, quantize or compile, first pass")


if __name__ == "__main__":
    main()

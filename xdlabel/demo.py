"""``xdlabel demo``: the main job on embedded defaults, as far as it exists today.

What exists: the X-Decoder model, strict checkpoint loading and the one-pass task API.
What does not yet: the bundled trained model (issue 5), the index and search API (issue 3),
the Label Studio bridge (issue 4) and ingestion jobs (issue 6). Until the bundled model lands,
the demo runs the reduced X-Decoder with the parity weights produced by the official code;
those weights are random, so the masks and captions show the plumbing, not quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"
CLASSES = ["person", "dog", "car", "sky", "grass"]
STUFF = ["sky", "grass"]


def _overlay(image: Image.Image, segment_map: np.ndarray) -> Image.Image:
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 255, size=(int(segment_map.max()) + 1, 3), dtype=np.uint8)
    colors[0] = 0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    painted = np.where(segment_map[..., None] > 0, 0.45 * rgb + 0.55 * colors[segment_map], rgb)
    return Image.fromarray(painted.astype(np.uint8))


def run_demo(out_dir: str) -> int:
    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.predictor import PredictorSettings

    weights = PARITY / "reduced_weights.safetensors"
    if not weights.is_file():
        print(f"error: demo weights not found at {weights} (run from a checkout of the repository)")
        return 2
    print("NOTE: the bundled trained model does not exist yet (issue 5). This demo runs the reduced")
    print("      X-Decoder with the official code's parity weights (random, untrained): outputs show")
    print("      the pipeline, not quality. Search, Label Studio and ingestion arrive with issues 3, 4, 6.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("parity")
    loaded = load_checkpoint(model, weights)
    print(f"model: parity config, {loaded.num_tensors} tensors, sha256 {loaded.sha256[:16]}…")
    predictor = Predictor(model, settings=PredictorSettings(short_side=240))
    paths = sorted(PARITY.glob("image*.png"))
    images = [Image.open(p) for p in paths]
    start = time.perf_counter()
    features = predictor.encode(images)
    panoptic = predictor.panoptic(features, CLASSES, stuff=STUFF)
    grounding = predictor.ground(features, ["the red car on the left"])
    captions = predictor.caption(features)
    image_emb = predictor.image_embeddings(features)
    elapsed = time.perf_counter() - start
    queries = ["a dog running on the grass", "a red car parked on a street"]
    scores = image_emb @ predictor.text_query_embeddings(queries).T
    report = []
    for k, (path, image) in enumerate(zip(paths, images, strict=True)):
        overlay = out / f"{path.stem}_panoptic.png"
        _overlay(image, panoptic[k].segment_map).save(overlay)
        report.append({
            "image": path.name,
            "panoptic_segments": [{"label": s.label, "score": round(s.score, 3), "area": s.area}
                                  for s in panoptic[k].segments],
            "grounding_area": int(grounding[k][0].mask.sum()),
            "caption": captions[k],
            "overlay": str(overlay),
        })
        print(f"{path.name}: {len(panoptic[k].segments)} segments, caption {captions[k]!r}")
    print("text search over the 2 images (official 0.5/0.5 retrieval score):")
    for j, q in enumerate(queries):
        ranked = np.argsort(-scores[:, j])
        print(f"  {q!r}: " + ", ".join(f"{paths[i].name} {scores[i, j]:.3f}" for i in ranked))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"all tasks from one encode pass in {elapsed:.2f}s; outputs in {out.resolve()}")
    return 0

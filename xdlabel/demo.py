"""``xdlabel demo``: the main job on embedded defaults, as far as it exists today.

Builds a small corpus (the two sample images plus seeded synthetic shape scenes), ingests it into
SQLite + FAISS under the output folder (one model pass per image), runs text searches and prints
the hits with scores, and writes PNG overlays of the panoptic pre-labels.

Not yet: the bundled trained model (issue 5; until then the reduced X-Decoder with the official
code's untrained parity weights runs, so the pipeline is real and its outputs are not meaningful),
the Label Studio import file (issue 4) and ingestion jobs (issue 6).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xdlabel.settings import DEFAULT_CHECKPOINT, Settings

SAMPLES = DEFAULT_CHECKPOINT.parent
CLASSES = ["person", "dog", "car", "sky", "grass", "circle", "square"]
STUFF = ["sky", "grass"]
QUERIES = ["a red circle on green grass", "a blue square", "a car on a street"]


def synthetic_scenes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Seeded scenes of coloured circles and squares on a sky/grass background."""
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (320, 240), (135, 190, 235))
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 150, 320, 240], fill=(70, 150, 60))
        for _ in range(int(rng.integers(1, 4))):
            name = list(colors)[int(rng.integers(len(colors)))]
            x, y, r = int(rng.integers(20, 280)), int(rng.integers(20, 200)), int(rng.integers(12, 40))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x - r, y - r, x + r, y + r], fill=colors[name])
        paths.append(folder / f"scene_{i:02d}.png")
        image.save(paths[-1])
    return paths


def _overlay(image: Image.Image, segment_map: np.ndarray) -> Image.Image:
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 255, size=(int(segment_map.max()) + 1, 3), dtype=np.uint8)
    colors[0] = 0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    painted = np.where(segment_map[..., None] > 0, 0.45 * rgb + 0.55 * colors[segment_map], rgb)
    return Image.fromarray(painted.astype(np.uint8))


def run_demo(out_dir: str) -> int:
    from index.db import upgrade
    from xdlabel.ingest import ingest_files
    from xdlabel.search import search_text
    from xdlabel.services import Services

    if not DEFAULT_CHECKPOINT.is_file():
        print(f"error: demo weights not found at {DEFAULT_CHECKPOINT} (run from a checkout of the repository)")
        return 2
    print("NOTE: the bundled trained model does not exist yet (issue 5). This demo runs the reduced")
    print("      X-Decoder with the official code's parity weights (random, untrained): everything below")
    print("      is the real pipeline, but masks, captions and rankings are not meaningful.")
    out = Path(out_dir)
    settings = Settings(data_dir=out / "data", short_side=256)
    upgrade(settings.sqlalchemy_url)
    corpus = sorted(SAMPLES.glob("image*.png")) + synthetic_scenes(out / "corpus", 10)
    services = Services(settings)
    start = time.perf_counter()
    report = ingest_files(services, "demo", corpus, tags=["demo"])
    elapsed = time.perf_counter() - start
    print(f"ingested {len(report.added)} images ({len(report.duplicates)} already there, {len(report.failed)} "
          f"failed) in {elapsed:.1f}s into {settings.sqlalchemy_url} and {settings.index_dir}")
    results: dict[str, list[dict[str, object]]] = {}
    for query in QUERIES:
        hits = search_text(services, query, k=3).hits
        results[query] = [{"score": h["score"], "uri": h["uri"], "caption": h["caption"]} for h in hits]
        print(f"search {query!r}:")
        for h in hits:
            print(f"  {h['score']:+.4f}  {Path(h['uri']).name:<22} caption: {h['caption']!r}")
    predictor = services.predictor
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for path in corpus[:4]:
        image = Image.open(path)
        panoptic = predictor.panoptic(predictor.encode(image), CLASSES, stuff=STUFF)[0]
        _overlay(image, panoptic.segment_map).save(overlays / f"{path.stem}_panoptic.png")
    (out / "search_results.json").write_text(json.dumps(results, indent=2))
    services.close()
    print(f"outputs: {overlays.resolve()} (panoptic overlays), {(out / 'search_results.json').resolve()}, "
          f"database and indexes under {settings.data_dir.resolve()}")
    return 0

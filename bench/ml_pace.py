"""How many tasks one "Retrieve predictions" request answers within the ML backend's budget.

Label Studio sends every selected task in one /ml/predict and gives up after its ML_TIMEOUT_PREDICT;
xdlabel answers chunks of PREDICT_CHUNK tasks while XDLABEL_ML_PREDICT_BUDGET lasts and hands the
rest to its background pre-label. This times /predict's own work per chunk (decode, encode,
predictions with masks, polygons, boxes and a caption for the README's labeling config) on
generated shape scenes with the bundled model at its default size, and prints seconds per task and
how many tasks fit in the budget. The download from Label Studio is not included. Also an
interactive click on each size: the first (the image's candidate masks made, on a grid of at most
CANDIDATE_PIXELS) and a later one (from the cache). Not a test.

    python bench/ml_pace.py [--size 640x480 --size 1280x960 --size 2000x1500] [--chunks 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from annotator.labeling import parse_labeling_config
from annotator.prelabel import PrelabelSettings, predictions
from xdecoder.transforms import read_image
from xdlabel.api.ml_interactive import FeatureCache, candidates, session_region
from xdlabel.api.ml_predict import PREDICT_CHUNK
from xdlabel.services import Services
from xdlabel.settings import Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.4">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="Grass" stuff="true"/>
    <Label value="Sky" stuff="true"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Ball"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Ball"/></RectangleLabels>
  <TextArea name="caption" toName="image"/>
</View>"""


def scene(width: int, height: int, seed: int) -> bytes:
    image = Image.new("RGB", (width, height), (60, 170, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, height // 3], fill=(120, 180, 240))
    x = (seed * 97) % (width // 2)
    draw.ellipse([x, height // 3, x + width // 4, height // 3 + width // 4], fill=(220, 40, 30))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help="WxH of the scenes (repeatable)")
    parser.add_argument("--chunks", type=int, default=3)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.size or ["640x480", "1280x960", "2000x1500"])]
    with tempfile.TemporaryDirectory() as folder:
        services = Services(Settings(data_dir=Path(folder)))
        predictor = services.predictor
        s = services.settings
        config = parse_labeling_config(CONFIG)
        budget = s.ml_predict_budget
        print(f"bundled model, short side {s.image_short_side}; budget {budget:.0f} s; chunks of {PREDICT_CHUNK}")
        print("| scene | s per task | tasks answered in the budget |")
        print("|---|---|---|")
        for width, height in sizes:
            predictions(predictor, predictor.encode([read_image(scene(width, height, 0), s.max_image_pixels)[0]]),
                        config, "bench", PrelabelSettings())  # warm-up
            started = time.perf_counter()
            for chunk in range(args.chunks):
                images = [read_image(scene(width, height, chunk * PREDICT_CHUNK + k), s.max_image_pixels)[0]
                          for k in range(PREDICT_CHUNK)]
                predictions(predictor, predictor.encode(images), config, "bench", PrelabelSettings())
            per_task = (time.perf_counter() - started) / (args.chunks * PREDICT_CHUNK)
            fit = int(budget / per_task) // PREDICT_CHUNK * PREDICT_CHUNK
            print(f"| {width}x{height} | {per_task:.2f} | {fit} |")
        print("\n| scene | first click, s | later click, s | cache held, MB |")
        print("|---|---|---|---|")
        clicks = [{"type": "keypointlabels", "is_positive": True,
                   "value": {"x": 30.0, "y": 50.0, "keypointlabels": ["Ball"]}}]
        for width, height in sizes:
            cache = FeatureCache(s.ml_feature_cache_mb << 20)
            features = predictor.encode([read_image(scene(width, height, 1), s.max_image_pixels)[0]])
            cache.put("image", features)
            seconds = []
            for _ in range(2):
                started = time.perf_counter()
                found = candidates(services, cache, "image", predictor, features, config)
                session_region(predictor, features, found, config, clicks, PrelabelSettings(), None)
                seconds.append(time.perf_counter() - started)
            print(f"| {width}x{height} | {seconds[0]:.2f} | {seconds[1]:.2f} | {cache.size / 2 ** 20:.1f} |")
        services.engine.dispose()


if __name__ == "__main__":
    main()

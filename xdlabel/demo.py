"""``xdlabel demo``: the main job on embedded defaults.

Builds a small corpus of held-out synthetic shape scenes (seeds the bundled model never trained
on), ingests it into SQLite + FAISS under the output folder (one model pass per image), runs text
searches and prints the hits with scores, writes PNG overlays of the panoptic pre-labels, and
writes a Label Studio import file (a labeling config and tasks with predictions) — or, when
XDLABEL_LS_URL and XDLABEL_LS_TOKEN are set, creates a project on that server and imports them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from xdecoder.training.synthetic import CLASSES, STUFF, make_scenes
from xdlabel.settings import BUNDLED_CHECKPOINT, Settings

SEED = 90_210  # held out: training scenes come from other seeds
QUERIES = ["a red circle", "two blue squares", "a yellow triangle on sand", "a green square on water"]
LABELING_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
{labels}
  </BrushLabels>
  <TextArea name="caption" toName="image" editable="true"/>
</View>
"""


def write_corpus(folder: Path, n: int, size: tuple[int, int] = (192, 128)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(make_scenes(n, seed=SEED, size=size)):
        paths.append(folder / f"scene_{i:02d}.png")
        Image.fromarray(scene.image).save(paths[-1])
    return paths


def _overlay(image: Image.Image, segment_map: np.ndarray, scale: int = 3) -> Image.Image:
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 255, size=(int(segment_map.max()) + 1, 3), dtype=np.uint8)
    colors[0] = 0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    painted = np.where(segment_map[..., None] > 0, 0.45 * rgb + 0.55 * colors[segment_map], rgb)
    out = Image.fromarray(painted.astype(np.uint8))
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)


def labeling_config() -> str:
    labels = [f'    <Label value="{c}" stuff="true"/>' if c in STUFF else f'    <Label value="{c}"/>' for c in CLASSES]
    return LABELING_CONFIG.format(labels="\n".join(labels))


def run_demo(out_dir: str) -> int:
    from annotator.labeling import parse_labeling_config
    from annotator.prelabel import predictions
    from index.db import upgrade
    from xdlabel.ingest import ingest_files
    from xdlabel.search import search_text
    from xdlabel.services import Services
    from xdlabel.settings import load_settings

    if not BUNDLED_CHECKPOINT.is_file():
        print(f"error: the bundled model is missing at {BUNDLED_CHECKPOINT} (make train-demo rebuilds it)")
        return 2
    out = Path(out_dir)
    env = load_settings()
    settings = Settings(data_dir=out / "data")
    upgrade(settings.sqlalchemy_url)
    corpus = write_corpus(out / "corpus", 12)
    services = Services(settings)
    print(f"model: {services.model_version_name} (bundled, trained on synthetic shape scenes)")
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
            print(f"  {h['score']:+.4f}  {Path(h['uri']).name:<14} caption: {h['caption']!r}")
    (out / "search_results.json").write_text(json.dumps(results, indent=2))

    # Pre-labels: panoptic overlays, and Label Studio tasks with the same masks as predictions.
    predictor = services.predictor
    features = predictor.encode([Image.open(p) for p in corpus])
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for path, panoptic in zip(corpus, predictor.panoptic(features, CLASSES, stuff=STUFF), strict=True):
        _overlay(Image.open(path), panoptic.segment_map).save(overlays / f"{path.stem}_panoptic.png")
    xml = labeling_config()
    made = predictions(predictor, features, parse_labeling_config(xml), services.model_version_name)
    tasks = [{"data": {"image": f"/data/local-files/?d={p.relative_to(out).as_posix()}"}, "predictions": [pred]}
             for p, pred in zip(corpus, made, strict=True)]
    ls_dir = out / "labelstudio"
    ls_dir.mkdir(parents=True, exist_ok=True)
    (ls_dir / "labeling-config.xml").write_text(xml)
    (ls_dir / "tasks.json").write_text(json.dumps(tasks))
    print(f"Label Studio import: {ls_dir.resolve()}/labeling-config.xml and tasks.json "
          f"({sum(len(p['result']) for p in made)} regions and captions as predictions); start Label Studio with "
          f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={out.resolve()} to see the images")
    if env.ls_url and env.ls_token:
        from xdlabel.settings import labelstudio_client

        client = labelstudio_client(env)
        project_id = client.create_project(f"xdlabel demo {time.strftime('%Y-%m-%d %H:%M')}", xml)
        client.import_tasks(project_id, tasks)
        print(f"pushed {len(tasks)} tasks with predictions to {env.ls_url}/projects/{project_id}")
    services.close()
    print(f"outputs: {overlays.resolve()} (panoptic overlays), {(out / 'search_results.json').resolve()}, "
          f"database and indexes under {settings.data_dir.resolve()}")
    return 0

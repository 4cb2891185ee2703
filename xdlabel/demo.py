"""``xdlabel demo``: the main job on embedded defaults.

Builds a small corpus of held-out synthetic shape scenes (seeds the bundled model never trained
on), ingests it into SQLite + FAISS under the output folder (one model pass per image), runs text
searches and prints the hits with scores (and a contact sheet PNG per query), writes PNG overlays of the
panoptic pre-labels (outlines, label and score per segment, legend), and writes a Label Studio import file
(a labeling config and tasks with predictions) — or, when
XDLABEL_LS_URL and XDLABEL_LS_TOKEN are set, creates a project on that server and imports them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from PIL import Image

from xdecoder.results import PanopticResult
from xdecoder.training.synthetic import CLASSES, COLORS, STUFF, THINGS, Scene, make_scenes
from xdlabel.overlay import Hit, LabeledMask, contact_sheet, overlay
from xdlabel.settings import BUNDLED_CHECKPOINT, Settings

SEED = 90_210  # held out: training scenes come from other seeds
CORPUS_SIZE = (192, 128)
# Each names a shape, colour and ground that one of the corpus's scenes holds (tests/test_demo.py checks the top
# hit holds all three); every other such query of the corpus is scored too and the rate printed.
QUERIES = ["a red circle on sand", "a green square on water", "a yellow triangle on grass", "a blue square on sand"]
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


def holds(scene: Scene, color: str, shape: str, ground: str) -> bool:
    """Whether a scene shows a ``color`` ``shape`` on ``ground`` (from its ground truth)."""
    names = {CLASSES[s.category_id] for s in scene.segments if not s.isthing}
    return ground in names and any(s.isthing and s.color == color and CLASSES[s.category_id] == shape
                                   for s in scene.segments)


def single_shape_queries(scenes: list[Scene]) -> list[tuple[str, str, str]]:
    """Every (colour, shape, ground) that some scene holds."""
    return [(c, k, g) for c in COLORS for k in THINGS for g in STUFF[1:] if any(holds(s, c, k, g) for s in scenes)]


def panoptic_overlay(image: Image.Image, panoptic: PanopticResult, title: str) -> Image.Image:
    return overlay(image, [LabeledMask(panoptic.segment_map == s.id, s.label, s.score) for s in panoptic.segments],
                   title)


def labeling_config() -> str:
    labels = [f'    <Label value="{c}" stuff="true"/>' if c in STUFF else f'    <Label value="{c}"/>' for c in CLASSES]
    return LABELING_CONFIG.format(labels="\n".join(labels))


def run_demo(out_dir: str | None = None) -> int:
    """The main job; outputs under ``out_dir``, by default ``<XDLABEL_DATA_DIR>/demo``."""
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
    env = load_settings()
    out = Path(out_dir) if out_dir else env.data_dir / "demo"
    settings = Settings(data_dir=out / "data")
    upgrade(settings.sqlalchemy_url)
    corpus = write_corpus(out / "corpus", 12, CORPUS_SIZE)
    services = Services(settings)
    print(f"model: {services.model_version_name} (bundled, trained on synthetic shape scenes)")
    start = time.perf_counter()
    report = ingest_files(services, "demo", corpus, tags=["demo"])
    elapsed = time.perf_counter() - start
    print(f"ingested {len(report.added)} images ({len(report.duplicates)} already there, {len(report.failed)} "
          f"failed) in {elapsed:.1f}s into {settings.sqlalchemy_url} and {settings.index_dir}")
    scenes = make_scenes(len(corpus), seed=SEED, size=CORPUS_SIZE)
    by_name = {p.name: (p, scene) for p, scene in zip(corpus, scenes, strict=True)}
    sheets = out / "contact-sheets"
    sheets.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, object]]] = {}
    for query in QUERIES:
        hits = search_text(services, query, k=3).hits
        results[query] = [{"score": h["score"], "uri": h["uri"], "caption": h["caption"]} for h in hits]
        color, shape, ground = re.fullmatch(r"an? (\w+) (\w+) on (\w+)", query).groups()  # type: ignore[union-attr]
        top_ok = holds(by_name[Path(hits[0]["uri"]).name][1], color, shape, ground)
        print(f"search {query!r}: top hit {'holds' if top_ok else 'does NOT hold'} a {color} {shape} on {ground}")
        for h in hits:
            print(f"  {h['score']:+.4f}  {Path(h['uri']).name:<14} caption: {h['caption']!r}")
        sheet = contact_sheet(query, [Hit(Image.open(by_name[Path(h["uri"]).name][0]), Path(h["uri"]).name,
                                          h["score"], h["caption"]) for h in hits])
        sheet.save(sheets / f"{re.sub(r'[^a-z]+', '-', query).strip('-')}.png")
    (out / "search_results.json").write_text(json.dumps(results, indent=2))
    grid = single_shape_queries(scenes)
    found = sum(holds(by_name[Path(search_text(services, f"a {c} {k} on {g}", k=1).hits[0]["uri"]).name][1], c, k, g)
                for c, k, g in grid)
    print(f"all {len(grid)} 'a <colour> <shape> on <ground>' queries this corpus answers: the top hit holds all "
          f"three for {found} (the bundled model is small; see README)")

    # Pre-labels: panoptic overlays, and Label Studio tasks with the same masks as predictions.
    predictor = services.predictor
    features = predictor.encode([Image.open(p) for p in corpus])
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for path, panoptic in zip(corpus, predictor.panoptic(features, CLASSES, stuff=STUFF), strict=True):
        panoptic_overlay(Image.open(path), panoptic, f"{path.name}: panoptic").save(overlays / f"{path.stem}.png")
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
    print(f"outputs: {overlays.resolve()} (panoptic overlays), {sheets.resolve()} (a contact sheet per query), "
          f"{(out / 'search_results.json').resolve()}, database and indexes under {settings.data_dir.resolve()}")
    print(f"""next:
  XDLABEL_DATA_DIR={settings.data_dir.resolve()} xdlabel apikey create demo     # a key for the API
  XDLABEL_DATA_DIR={settings.data_dir.resolve()} xdlabel serve --port 8000
  open http://127.0.0.1:8000/ (the search page; paste the key) and search 'a green square on water'
  Label Studio: create a project with {ls_dir.resolve()}/labeling-config.xml, import tasks.json, or rerun
  with XDLABEL_LS_URL and XDLABEL_LS_TOKEN set to push them""")
    return 0

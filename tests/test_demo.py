"""``xdlabel demo`` as a user runs it: outputs under XDLABEL_DATA_DIR, each query's top hit holds the queried
shape, colour and ground (checked against the generator's ground truth, not the model's caption), pictures
written at least at the corpus's size, and the printout ends with what to try next."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from xdecoder.training.synthetic import CLASSES, make_scenes
from xdlabel.demo import CORPUS_SIZE, QUERIES, SEED


def test_demo_answers_its_queries_under_the_data_dir(tmp_path: Path) -> None:
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("XDLABEL_LS_URL", None)
    run = subprocess.run([sys.executable, "-m", "xdlabel.cli", "demo"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "demo"
    assert not (tmp_path / "xdlabel-data").exists()
    results = json.loads((out / "search_results.json").read_text())
    assert list(results) == QUERIES
    scenes = {f"scene_{i:02d}.png": s for i, s in enumerate(make_scenes(12, seed=SEED, size=CORPUS_SIZE))}
    for query, hits in results.items():
        color, shape, ground = re.fullmatch(r"an? (\w+) (\w+) on (\w+)", query).groups()  # type: ignore[union-attr]
        answers = [n for n, s in scenes.items() if ground in {CLASSES[g.category_id] for g in s.segments}
                   and any(g.color == color and CLASSES[g.category_id] == shape for g in s.segments)]
        assert answers, f"{query!r} has no answer in the corpus"
        assert Path(hits[0]["uri"]).name in answers, (query, hits[0], answers)
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 12
    assert all(Image.open(p).width >= CORPUS_SIZE[0] and Image.open(p).height >= CORPUS_SIZE[1] for p in overlays)
    assert len(list((out / "contact-sheets").glob("*.png"))) == len(QUERIES)
    tail = run.stdout.strip().splitlines()[-6:]
    assert tail[0] == "next:" and any("xdlabel serve" in line for line in tail), tail
    assert any(str(tmp_path) in line for line in tail)

"""``xdlabel prelabel --preview DIR`` as a process against a real Label Studio: one PNG per task, drawn by the
shared overlay function from the very prediction Label Studio received (one legend row per mask, polygon or
box result, in its order, with its score), at least at the task image's size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from annotator.client import LabelStudioClient
from annotator.convert import result_label, result_to_mask
from annotator.localserver import LocalLabelStudio
from tests.test_ls_labels_live import SHAPES_CONFIG, shapes_project
from xdlabel.overlay import LEGEND_WIDTH, MIN_SHORT_SIDE, PALETTE


def test_prelabel_preview_draws_what_label_studio_received(label_studio: LocalLabelStudio, tmp_path: Path) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.token)
    project_id, task_ids = shapes_project(client, label_studio, "preview", 3, SHAPES_CONFIG)
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_LS_URL": label_studio.url,
           "XDLABEL_LS_TOKEN": label_studio.token, "XDLABEL_CAPTION_STEPS": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "xdlabel.cli", "prelabel", "--project", str(project_id),
                           "--threshold", "0.3", "--no-captions", "--preview", str(tmp_path / "preview"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "preview").iterdir()) == sorted(f"task-{t}.png" for t in task_ids)
    drawn_rows = 0
    for task in client.tasks(project_id):
        results = [r for p in task["predictions"] for r in p["result"] if result_to_mask(r) is not None]
        picture = np.asarray(Image.open(tmp_path / "preview" / f"task-{task['id']}.png").convert("RGB"))
        scale = -(-MIN_SHORT_SIDE // 64)  # the scenes are 96 x 64
        assert picture.shape[1] == 96 * scale + LEGEND_WIDTH and picture.shape[0] >= 64 * scale
        swatches = [tuple(picture[34 + 22 * i + 8, 96 * scale + 18]) for i in range(len(results) + 1)]
        assert swatches[:-1] == [PALETTE[i % len(PALETTE)] for i in range(len(results))], task["id"]
        assert swatches[-1] == (255, 255, 255)  # nothing listed that Label Studio did not get
        assert all(result_label(r) for r in results)
        drawn_rows += len(results)
    assert drawn_rows > 0  # the check above compared real rows, not empty lists

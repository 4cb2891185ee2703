"""The API's warm-up: the model and its image index load before the first request, and what they
hold is taken out of the garbage collector's full passes (each pass walked every long-lived object,
a pause that every request in flight waited out). Run in a child process: freezing is process-wide
and would outlive this test in pytest's own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from index.db import upgrade

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import gc, json, logging, sys
from pathlib import Path
from xdlabel.api.app import warm_up
from xdlabel.services import Services
from xdlabel.settings import Settings

logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
data, url, checkpoint = sys.argv[1:4]
settings = Settings(data_dir=Path(data), database_url=url, **({"checkpoint": checkpoint} if checkpoint else {}))
services = Services(settings)
gc.collect()
tracked_before = len(gc.get_objects())
warm_up(services)
print(json.dumps({"model_loaded": "model" in services.__dict__, "indexes": len(services.store._live),
                  "frozen": gc.get_freeze_count(), "tracked_before": tracked_before,
                  "tracked_after": len(gc.get_objects())}))
"""


def _warm(tmp_path: Path, checkpoint: str = "") -> tuple[dict[str, object], str]:
    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(url)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), url, checkpoint], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_warm_up_loads_the_model_and_index_and_freezes_them(tmp_path: Path) -> None:
    report, _ = _warm(tmp_path)
    assert report["model_loaded"] and report["indexes"] == 1
    # everything alive after the load is frozen; a full pass now walks what later requests make
    assert report["frozen"] > report["tracked_before"] > 0
    assert report["tracked_after"] * 20 < report["frozen"], report


def test_a_model_that_does_not_load_is_logged_and_nothing_is_frozen(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    report, log = _warm(tmp_path, str(broken))
    assert not report["model_loaded"] and report["indexes"] == 0 and report["frozen"] == 0
    assert "warm-up: the model or its index did not load" in log

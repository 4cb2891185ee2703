"""The xdlabel command line, run as a user runs it (subprocesses, settings from XDLABEL_*)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_api import make_images


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdlabel.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_ingest_search_rebuild_and_keys(tmp_path: Path) -> None:
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_SHORT_SIDE": "128"}
    photos = make_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = run(["ingest", str(tmp_path / "photos"), "--dataset", "cli", "--tag", "demo", "--json"], env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["added"] == 3 and list(summary["failed"]) == [(tmp_path / "photos" / "broken.png").as_uri()]
    r = run(["ingest", str(photos[0]), "--dataset", "cli"], env)  # same bytes again: stored once
    assert "0 images added, 1 duplicates skipped" in r.stdout
    r = run(["search", "a circle", "-k", "2", "--json", "--tag", "demo"], env)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    (tmp_path / "data" / "index").joinpath(next(p.name for p in (tmp_path / "data" / "index").glob("*image.faiss"))
                                           ).write_bytes(b"corrupt")
    r = run(["index", "rebuild", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image"] == {"action": "rebuilt", "count": 3}
    r = run(["apikey", "create", "ci", "--scopes", "read"], env)
    assert r.returncode == 0 and r.stdout.startswith("xdl_")
    r = run(["apikey", "create", "ci", "--scopes", "admin"], env)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown scopes") and "Traceback" not in r.stderr


def test_missing_path_and_bad_checkpoint_exit_nonzero(tmp_path: Path) -> None:
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data")}
    r = run(["ingest", str(tmp_path / "nope"), "--dataset", "x"], env)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run(["model", "info", "--config", "focalt", "--checkpoint", str(tmp_path / "missing.pt")], env)
    assert r.returncode == 2 and "not found" in r.stderr

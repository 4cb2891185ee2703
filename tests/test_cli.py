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


def test_fresh_data_folder_keys_and_one_line_errors(tmp_path: Path) -> None:
    """On a fresh data folder every command that needs the database migrates it first (no `no such
    table` traceback); keys are listed without their hash and revoked; user errors and a dead
    database are one `error:` line (exit 2) and --debug adds the traceback; an unreachable URL among
    ingest sources is a failed item, the run goes on."""
    env = {**os.environ, "XDLABEL_DATA_DIR": str(tmp_path / "data"), "XDLABEL_SHORT_SIDE": "128"}
    r = run(["apikey", "create", "first", "--scopes", "read"], env)
    assert r.returncode == 0 and r.stdout.startswith("xdl_"), r.stderr
    key = r.stdout.strip()
    r = run(["search", "a circle", "--json"], {**env, "XDLABEL_DATA_DIR": str(tmp_path / "fresh2")})
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    r = run(["index", "rebuild", "--json"], {**env, "XDLABEL_DATA_DIR": str(tmp_path / "fresh3")})
    assert r.returncode == 0 and json.loads(r.stdout)["image"]["count"] == 0, r.stderr
    r = run(["apikey", "list", "--json"], env)
    listed = json.loads(r.stdout)
    assert [(k["name"], k["scopes"], k["revoked_at"]) for k in listed] == [("first", ["read"], None)]
    assert key not in r.stdout and "hash" not in r.stdout
    r = run(["apikey", "revoke", str(listed[0]["id"])], env)
    assert r.returncode == 0 and "revoked" in r.stdout
    assert json.loads(run(["apikey", "list", "--json"], env).stdout)[0]["revoked_at"]
    r = run(["apikey", "revoke", "4242"], env)
    assert r.returncode == 2 and r.stderr.strip() == "error: no API key with id 4242; see xdlabel apikey list"
    dead = {**env, "XDLABEL_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    r = run(["apikey", "list"], dead)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: database error:") and "XDLABEL_DATABASE_URL" in r.stderr
    r = run(["--debug", "apikey", "list"], dead)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")
    photo = make_images(tmp_path / "photos", 1)[0]
    r = run(["ingest", "http://127.0.0.1:1/unreachable.png", str(photo), "--dataset", "d", "--json"],
            {**env, "XDLABEL_ALLOW_PRIVATE_URLS": "true"})
    assert "Traceback" not in r.stderr, r.stderr
    summary = json.loads(r.stdout)
    assert summary["added"] == 1 and list(summary["failed"]) == ["http://127.0.0.1:1/unreachable.png"]


def test_the_command_line_never_reads_the_data_folder(tmp_path: Path) -> None:
    """`xdlabel ingest` of the database file, the index folder or the data folder itself (directly, by
    a symlink, or named in a list file) stores nothing from it: the data folder is never a source."""
    data = tmp_path / "data"
    env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_SHORT_SIDE": "64"}
    photo = make_images(tmp_path / "photos", 1)[0]
    assert run(["ingest", str(photo), "--dataset", "d"], env).returncode == 0  # the database now exists
    (tmp_path / "link.db").symlink_to(data / "xdlabel.db")
    (tmp_path / "list.txt").write_text(f"{data / 'xdlabel.db'}\n")
    for source in (data / "xdlabel.db", data, data / "index", tmp_path / "link.db", tmp_path / "list.txt"):
        r = run(["ingest", str(source), "--dataset", "leak", "--json"], env)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 0:  # a folder with nothing allowed in it: nothing added, nothing read
            assert json.loads(r.stdout)["added"] == 0, (source, r.stdout)
        else:
            assert r.returncode == 2 and "data folder" in r.stderr, (source, r.stderr)
    r = run(["search", "a circle", "--json"], env)
    assert {hit["uri"] for hit in json.loads(r.stdout)} == {photo.name}, "something else was stored"

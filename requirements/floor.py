"""``make floor``: the declared minimums of the direct dependencies are true.

1. uv resolves pyproject's runtime dependencies with ``--resolution lowest-direct`` (each direct dependency
   at its lowest allowed release, torch pinned to the CPU file); every direct dependency must land exactly
   on its declared floor: a floor that nothing can install together with the rest is a false floor.
2. That set is installed into ``.venv-floor`` (kept while the resolution is unchanged, so reruns are cheap;
   uv's cache makes a rebuild quick), with pytest and the project itself.
3. In it every direct dependency is imported and the tokenizer and parity tests run: the official tokenizer
   ids, the bicubic preprocessing and a forward pass of the model against the golden outputs; also BLEU-4
   (sacrebleu) and video sampling of real encoded files (PyAV).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-floor"
FIND_LINKS = "/opt/wheels"
# PyAV's floor is exercised by encoding and sampling real mp4/mkv/webm/mov files (no database needed).
# test_index_file: FAISS at its floor has no IO_FLAG_MMAP_IFC, so saved indexes are read whole there;
# test_index_locking: an IVF add there too goes through add_core with lists assigned beforehand.
TESTS = ["tests/test_tokenizer.py", "tests/test_parity.py", "tests/test_bleu.py", "tests/test_index_file.py",
         "tests/test_index_locking.py",
         "tests/test_video_ingest.py::test_fps_and_every_n_sample_the_expected_timestamps",
         "tests/test_video_ingest.py::test_scene_sampling_skips_static_stretches"]
# Import names that differ from the distribution names.
MODULES = {"pillow": "PIL", "faiss-cpu": "faiss", "psycopg": "psycopg", "pycocotools": "pycocotools.mask",
           "scikit-image": "skimage", "python-multipart": "multipart", "pydantic-settings": "pydantic_settings",
           "label-studio-sdk": "label_studio_sdk", "huggingface-hub": "huggingface_hub", "av": "av"}


def _uv() -> str:
    return str(Path(sys.executable).with_name("uv"))


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def floor_of(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


def resolve_lowest() -> dict[str, str]:
    out = subprocess.run([_uv(), "pip", "compile", "pyproject.toml", "--quiet", "--resolution", "lowest-direct",
                          "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
                          "--find-links", FIND_LINKS, "-c", "requirements/torch.txt", "--no-header",
                          "--no-annotate"], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def check_floors(pins: dict[str, str]) -> list[str]:
    problems = []
    for req in declared():
        name = req.name.lower().replace("_", "-")
        low = floor_of(req)
        if low is None:
            problems.append(f"{req.name}: no declared floor")
        elif Version(pins[name].split("+")[0]) != low:
            problems.append(f"{req.name}: declared floor {low}, but the lowest that installs with the rest is "
                            f"{pins[name]}")
    return problems


def build_venv(pins: dict[str, str]) -> None:
    # pytest at the version the test lock pins, so the run uses the project's own test runner.
    pytest_pin = next(line.split()[0] for line in (ROOT / "requirements/test.txt").read_text().splitlines()
                      if line.startswith("pytest=="))
    lines = sorted(f"{n}=={v}" for n, v in pins.items()) + [pytest_pin]
    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    stamp = VENV / ".floor"
    if stamp.is_file() and stamp.read_text() == key:
        print(f"{VENV.name}: unchanged resolution, reused")
        return
    subprocess.run([_uv(), "venv", "--quiet", "--clear", "--python", sys.executable, str(VENV)], check=True)
    python = str(VENV / "bin/python")
    req_file = VENV / "floor-requirements.txt"
    req_file.write_text("\n".join(lines) + "\n")
    install = [_uv(), "pip", "install", "--quiet", "--python", python, "--find-links", FIND_LINKS, "-r", str(req_file)]
    if subprocess.run(install).returncode != 0:
        # The transitive pins are the index's newest: a release minutes old can be listed by the resolution's
        # request and missing from the install's (typer 0.29.3 was, twice; a stale cached index page or the
        # index's CDN), so one retry after a pause, with uv's cached index pages revalidated.
        print("floor install failed; retrying in 90 s with the index refreshed", file=sys.stderr)
        time.sleep(90)
        subprocess.run([*install, "--refresh"], check=True)
    subprocess.run([_uv(), "pip", "install", "--quiet", "--python", python, "--no-deps", "-e", str(ROOT)],
                   check=True)
    stamp.write_text(key)


def main() -> int:
    pins = resolve_lowest()
    problems = check_floors(pins)
    direct = {r.name.lower().replace("_", "-") for r in declared()}
    print("lowest-direct resolution:", ", ".join(f"{n}=={pins[n]}" for n in sorted(direct)))
    if problems:
        print("false floors in pyproject.toml:\n  " + "\n  ".join(problems))
        return 1
    build_venv(pins)
    python = str(VENV / "bin/python")
    imports = "; ".join(f"import {MODULES.get(n, n.replace('-', '_'))}" for n in sorted(direct))
    subprocess.run([python, "-c", imports], check=True, cwd=ROOT)
    return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())

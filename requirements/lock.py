"""Regenerate the install locks from pyproject.toml: ``make lock`` (needs the package index).

``runtime.txt`` is what ``make demo`` installs (the dependencies alone); ``test.txt`` adds the dev and ray
extras for ``make test``. Both are resolved by uv for CPython 3.11 on Linux, carry sha256 hashes, and pin torch
to the CPU file (``torch.txt``). Their first line is a digest of pyproject's dependency tables, which
tests/test_lock.py recomputes, so a pyproject edit without a new lock fails the tests.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "requirements"
FIND_LINKS = "/opt/wheels"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "
# name -> extras of pyproject; the test lock is resolved first and constrains the runtime one.
LOCKS = {"test.txt": ["dev", "ray"], "runtime.txt": []}


def dependency_digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    table = {"requires-python": project["requires-python"], "dependencies": project["dependencies"],
             "optional-dependencies": project.get("optional-dependencies", {})}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def uv_compile(out: Path, extras: list[str], *extra_args: str) -> None:
    uv = Path(sys.executable).with_name("uv")
    cmd = [str(uv), "pip", "compile", str(ROOT / "pyproject.toml"), "--quiet", "--python-version", "3.11",
           "--python-platform", "x86_64-manylinux_2_28", "--find-links", FIND_LINKS,
           "-c", str(HERE / "torch.txt"), "--custom-compile-command", "make lock", "-o", str(out), *extra_args]
    for extra in extras:
        cmd += ["--extra", extra]
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    digest = dependency_digest()
    for name, extras in LOCKS.items():
        out = HERE / name
        args = ["--generate-hashes"] + (["-c", str(HERE / "test.txt")] if name == "runtime.txt" else [])
        uv_compile(out, extras, *args)
        out.write_text(f"{DIGEST_PREFIX}{digest}\n" + out.read_text())
        pins = sum(1 for line in out.read_text().splitlines() if "==" in line and not line.startswith(" "))
        print(f"{out.relative_to(ROOT)}: {pins} pinned packages")
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "pip", "compile", "--quiet", "uv.in", "--generate-hashes", "--python-version", "3.11",
                    "--custom-compile-command", "make lock", "-o", "uv.txt"], check=True, cwd=HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The install locks (requirements/*.txt, written by ``make lock``) match pyproject.toml.

Checked without the network: the digest of pyproject's dependency tables in each lock's first line, every
declared requirement pinned at a version its range allows (extras included: ``psycopg[binary]`` pins
psycopg-binary), every pin hash-checked, torch the CPU file, and the runtime lock a subset of the test lock.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lock_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("lock", REQ / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) from a uv/pip-tools requirements file."""
    text = (REQ / name).read_text()
    found: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=\S)", text):
        head = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if head:
            found[canonicalize_name(head[1])] = (Version(head[2]), block.count("--hash=sha256:"))
    return found


def expected(lock: str) -> list[Requirement]:
    extras = _lock_module().LOCKS[lock]
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt"])
def test_lock_was_made_from_this_pyproject(lock: str) -> None:
    first = (REQ / lock).read_text().splitlines()[0]
    lock_module = _lock_module()
    assert first == lock_module.DIGEST_PREFIX + lock_module.dependency_digest(), \
        f"pyproject.toml's dependencies changed since requirements/{lock} was made: run `make lock`"


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt"])
def test_every_declared_requirement_is_pinned_inside_its_range(lock: str) -> None:
    pinned = pins(lock)
    assert pinned, f"no pins read from {lock}"
    for req in expected(lock):
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} is not in {lock}"
        version = pinned[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{lock} pins {name}=={version}, outside {req}"
        if name == "psycopg" and "binary" in req.extras:
            assert "psycopg-binary" in pinned
        if name == "ray" and "data" in req.extras:
            assert "pyarrow" in pinned  # what ray[data] adds
    unhashed = [n for n, (_, hashes) in pinned.items() if hashes == 0]
    assert not unhashed, f"pins without a hash in {lock}: {unhashed}"
    torch = Version((REQ / "torch.txt").read_text().split("torch==")[1].split()[0])
    assert pinned["torch"][0] == torch and torch.local == "cpu"


def test_the_runtime_lock_is_the_test_locks_subset() -> None:
    runtime, test = pins("runtime.txt"), pins("test.txt")
    differ = {n: (v, test.get(n, (None,))[0]) for n, (v, _) in runtime.items() if test.get(n, (None,))[0] != v}
    assert not differ, f"runtime pins missing or different in test.txt: {differ}"
    # The lean default: no dev tools and no Ray in what `make demo` installs.
    for heavy in ("ray", "pyarrow", "pytest", "mypy", "playwright", "transformers"):
        assert heavy not in runtime, heavy
    assert {"ray", "pytest", "mypy"} <= set(test)

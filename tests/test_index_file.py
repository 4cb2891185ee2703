"""The saved index file: an IVF index opens with its lists mapped from the file, answers exactly as
the index that was saved, turns its lists into memory on the first write (beside running
searches), and refuses truncated or foreign files with a clear error. Files of the earlier layout
(manifest first) still open."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import indexfile
from index.vectors import IndexParams, VectorIndex
from tests.test_vectors import DIM, clustered

PARAMS = IndexParams(exact_max=500, nlist=32, nprobe=8)
WIDE = IndexParams(exact_max=500, nlist=1024, nprobe=64)  # many lists: the copy takes a while
MAPS_VISIBLE = Path("/proc/self/maps").exists()
COMPRESSED = IndexParams(exact_max=500, nlist=32, nprobe=8, compress_past=500)  # IVF-PQ, full vectors on disk
MAPS = hasattr(faiss, "IO_FLAG_MMAP_IFC")  # FAISS 1.15 has it, 1.9 (the floor) reads the lists whole


def built(n: int, seed: int, params: IndexParams = PARAMS, path: Path | None = None
          ) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    x = clustered(n, seed=seed)
    ids = np.arange(n, dtype=np.int64) * 3 + 5
    return VectorIndex.build(DIM, ids, x, params, path), ids, x


@pytest.mark.parametrize("params", [PARAMS, COMPRESSED], ids=["ivf", "ivfpq"])
def test_random_writes_on_a_mapped_index_match_one_never_saved(tmp_path: Path, params: IndexParams) -> None:
    """20 trials, each: an IVF (or IVF-PQ) index of 600-1500 vectors is saved and reopened from a
    copy of its folder (mapped), then it and the original take the same random sequence of 1-6
    steps (add 1-80 new vectors, remove 1-50 ids, one of them absent) with searches between: the
    ids and the hits (and their scores, to 1e-6) are the same after every step, and the reopened
    index stops being mapped at its first write."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        path = tmp_path / f"{trial}" / "i.faiss"
        path.parent.mkdir()
        index, ids, _ = built(int(rng.integers(600, 1500)), seed=trial, params=params, path=path)
        index.save(path, position=trial, owners=(ids, ids + 1))
        copy = shutil.copytree(path.parent, tmp_path / f"{trial}-copy") / path.name
        loaded, manifest, owners = VectorIndex.load_with_owners(copy, params)
        assert loaded.kind == index.kind == ("ivf" if params is PARAMS else "ivfpq")
        assert loaded.mapped == MAPS and (_maps(copy) > 0) == (MAPS and MAPS_VISIBLE)  # FAISS did map it
        assert manifest.position == trial and owners is not None
        assert np.array_equal(owners[0], ids) and np.array_equal(owners[1], ids + 1)
        queries = clustered(8, seed=1000 + trial)
        next_id = int(ids.max()) + 1
        for step in range(int(rng.integers(1, 7))):
            a, b = index.search(queries, 10), loaded.search(queries, 10)
            assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-6), (trial, step)
            if rng.random() < 0.5:
                count = int(rng.integers(1, 81))
                new_ids = np.arange(next_id, next_id + count, dtype=np.int64)
                next_id += count
                x = clustered(count, seed=int(rng.integers(1 << 30)))
                index.add(new_ids, x)
                loaded.add(new_ids, x)
            else:
                present = index.ids()
                victims = np.concatenate([rng.choice(present, int(rng.integers(1, 51)), replace=False),
                                          [next_id + 10_000]])  # one id never added
                assert index.remove(victims) == loaded.remove(victims)
            assert not loaded.mapped and _maps(copy) == 0
            assert np.array_equal(np.sort(index.ids()), np.sort(loaded.ids()))
        a, b = index.search(queries, 10), loaded.search(queries, 10)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-6), trial


def test_searches_run_while_the_first_write_copies_the_lists(tmp_path: Path) -> None:
    """10 trials: 4 threads search a freshly opened (mapped) index of 100k vectors in a loop while the
    main thread adds 50 vectors, which copies the lists into memory and swaps them in. No search
    fails or crashes the process; every answer is the one from before the add or the one after it
    (which differ: the queries are the added vectors, each its own top hit after); searches finished
    while the add ran in at least one trial; afterwards the file is no longer mapped."""
    index, _, _ = built(100_000, seed=7, params=WIDE)
    path = tmp_path / "i.faiss"
    index.save(path)
    extra = clustered(50, seed=98)
    extra_ids = np.arange(50, dtype=np.int64) + 10**6
    queries = extra[:4]
    before = index.search(queries, 10)[1]
    index.add(extra_ids, extra)
    after = index.search(queries, 10)[1]
    assert not np.array_equal(before, after) and np.array_equal(after[:, 0], extra_ids[:4])
    overlapping = 0
    for trial in range(10):
        loaded, _ = VectorIndex.load(path, WIDE)
        assert loaded.mapped == MAPS and (_maps(path) > 0) == (MAPS and MAPS_VISIBLE)
        stop, answers, errors = threading.Event(), [], []  # type: ignore[var-annotated]
        threads = [threading.Thread(target=_search_until, args=(loaded, queries, stop, answers, errors))
                   for _ in range(4)]
        for t in threads:
            t.start()
        while not answers and not errors:  # every thread is searching before the write starts
            time.sleep(0.001)
        start = time.perf_counter()
        loaded.add(extra_ids, extra)
        end = time.perf_counter()
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors and answers, (trial, errors)
        assert all(np.array_equal(a, before) or np.array_equal(a, after) for _, a in answers), trial
        overlapping += sum(start < done < end for done, _ in answers)
        assert np.array_equal(loaded.search(queries, 10)[1], after) and not loaded.mapped
        assert _maps(path) == 0  # nothing of the file stays mapped after the copy
        del loaded
    assert overlapping > 0 or not MAPS, "no search ran while the lists were copied"


def _maps(path: Path) -> int:
    """How many of this process's memory mappings are of ``path`` (0 without /proc)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return 0
    fields = (line.split(maxsplit=5) for line in maps.read_text().splitlines())
    return sum(len(f) == 6 and f[5].removesuffix(" (deleted)") == str(path) for f in fields)


def _search_until(index: VectorIndex, queries: np.ndarray, stop: threading.Event,
                  answers: list[tuple[float, np.ndarray]], errors: list[Exception]) -> None:
    try:
        while not stop.is_set():
            found = index.search(queries, 10)[1]
            answers.append((time.perf_counter(), found))
    except Exception as err:  # noqa: BLE001 - the test reports any failure
        errors.append(err)


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    """An IVF and a flat index file cut at 40 random lengths each, and 3 foreign files: every load
    raises ValueError or RuntimeError (none crashes or loads something)."""
    rng = np.random.default_rng(3)
    for name, (index, ids, _) in {"ivf": built(800, 1), "flat": built(300, 2)}.items():
        path = tmp_path / f"{name}.faiss"
        index.save(path, owners=(ids, ids))
        whole = path.read_bytes()
        cut = tmp_path / "cut.faiss"
        for length in rng.integers(0, len(whole) - 1, 40):
            cut.write_bytes(whole[:length])
            with pytest.raises((ValueError, RuntimeError)):
                VectorIndex.load(cut, PARAMS)
    for junk in (b"", b"garbage", b"\0" * 4096 + indexfile.END):
        (tmp_path / "junk.faiss").write_bytes(junk)
        with pytest.raises(ValueError, match="not an xdlabel index file"):
            VectorIndex.load(tmp_path / "junk.faiss", PARAMS)


def _file(index: VectorIndex, manifest: dict[str, object], ids: bytes, offset: int | None = None) -> bytes:
    """A file of the current layout, built by hand from its parts (``offset``: the trailer's, if not true)."""
    body = faiss.serialize_index(index.index).tobytes()
    header = json.dumps(manifest).encode()
    start = len(body) if offset is None else offset
    return (body + indexfile.TRAILER + len(header).to_bytes(8, "little") + header + ids
            + start.to_bytes(8, "little") + indexfile.END)


def test_damaged_trailers_and_indexes_are_refused(tmp_path: Path) -> None:
    """10 damaged files with an intact end mark, each refused with ValueError or RuntimeError (the id
    counts before any id is read): a broken FAISS header, a manifest that is not JSON, id counts of
    10^12, 2^61, -1 and "3" (the file holds 2 x 900), a trailer offset pointing into the index, a
    count larger than the id bytes present, and a manifest claiming a rotation the file does not
    hold, or one of a dimension of 2^40."""
    index, ids, _ = built(900, seed=4)
    good = asdict(index.manifest(position=5)) | {"owners": True}
    id_bytes = ids.astype("<i8").tobytes() * 2
    path = tmp_path / "bad.faiss"
    path.write_bytes(_file(index, good, id_bytes))
    assert VectorIndex.load_with_owners(path, PARAMS)[0].ntotal == 900  # the hand-built file is sound
    whole = bytearray(path.read_bytes())
    cases: dict[str, bytes] = {"faiss header": b"XXXX" + bytes(whole[4:])}
    header = json.dumps(good).encode()
    at = whole.index(header)
    cases["manifest not JSON"] = bytes(whole[:at]) + b"{" * len(header) + bytes(whole[at + len(header):])
    for count in (10**12, 2**61, -1, "3", 901):
        cases[f"count {count!r}"] = _file(index, good | {"count": count}, id_bytes)
    cases["offset into the index"] = _file(index, good, id_bytes, offset=100)
    cases["rotation not there"] = _file(index, good | {"rotated": True}, id_bytes)
    cases["rotation of 2^40 dimensions"] = _file(index, good | {"rotated": True, "dim": 2**40}, id_bytes)
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises((ValueError, RuntimeError)):
            VectorIndex.load_with_owners(path, PARAMS)
            pytest.fail(name)


@pytest.mark.parametrize("with_owners", [True, False], ids=["XDLIDX2", "XDLIDX1"])
def test_a_file_of_the_earlier_layout_still_opens(tmp_path: Path, with_owners: bool) -> None:
    """The layouts written before the trailer (magic, manifest, the id arrays when saved with them,
    then the index): open read whole (not mapped), with their map when they have one, and answer as
    the index saved."""
    index, ids, _ = built(900, seed=4)
    path = tmp_path / "old.faiss"
    manifest = asdict(index.manifest(position=5)) | {"owners": with_owners}
    header = json.dumps(manifest).encode()
    with open(path, "wb") as f:
        f.write((indexfile.LEGACY_OWNERS if with_owners else indexfile.LEGACY) + len(header).to_bytes(8, "little"))
        f.write(header + (ids.astype("<i8").tobytes() + (ids * 2).astype("<i8").tobytes() if with_owners else b""))
        faiss.write_index(index.index, faiss.PyCallbackIOWriter(f.write))
    loaded, read, owners = VectorIndex.load_with_owners(path, PARAMS)
    assert not loaded.mapped and read.position == 5 and loaded.ntotal == 900
    assert (owners is not None and np.array_equal(owners[1], ids * 2)) if with_owners else owners is None
    queries = clustered(5, seed=5)
    assert np.array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])

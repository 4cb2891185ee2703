"""Who waits for whom inside one index: searches share it with each other and with a save; adds,
removes and saves go one at a time; an IVF add assigns its lists before it excludes searches.
Injected: a save held open on a gate, an add whose list assignment is held on a gate, and 4 threads
searching throughout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import indexfile
from index.vectors import IndexParams, VectorIndex
from tests.test_vectors import DIM, brute, clustered

PARAMS = IndexParams(exact_max=500, nlist=16)


def searching(index: VectorIndex, queries: np.ndarray, stop: threading.Event, done: list[float]) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        index.search(queries, 10)
        done.append(time.perf_counter() - began)


def test_searches_run_during_a_save_and_an_add_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save is held inside its file write: 4 search threads keep answering meanwhile, while an add
    waits; the file holds the index as it was, and the add lands once the save is done."""
    x = clustered(3000, seed=1)
    index = VectorIndex.build(DIM, np.arange(1, 3001), x, PARAMS)
    writing, gate = threading.Event(), threading.Event()
    real = indexfile.write

    def held(*args: object, **kwargs: object) -> None:
        writing.set()
        assert gate.wait(30)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(indexfile, "write", held)
    saver = threading.Thread(target=index.save, args=(tmp_path / "i.faiss", 7))
    saver.start()
    assert writing.wait(10)
    stop, done = threading.Event(), []  # type: ignore[var-annotated]
    searchers = [threading.Thread(target=searching, args=(index, clustered(4, seed=s), stop, done)) for s in range(4)]
    for t in searchers:
        t.start()
    adder = threading.Thread(target=index.add, args=(np.array([5001]), clustered(1, seed=9)))
    adder.start()
    time.sleep(0.5)
    during = len(done)
    assert during > 20, f"only {during} searches finished while the save was held"
    assert adder.is_alive(), "an add ran during the save"
    gate.set()
    saver.join(10)
    adder.join(10)
    stop.set()
    for t in searchers:
        t.join(10)
    assert not adder.is_alive() and index.ntotal == 3001
    saved, manifest = VectorIndex.load(tmp_path / "i.faiss")
    assert saved.ntotal == manifest.count == 3000 and manifest.position == 7


def test_an_ivf_add_assigns_lists_beside_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The add's list assignment is held on a gate: searches keep answering. Afterwards every list
    holds exactly the ids a plain FAISS add puts there, and search equals brute force with every
    list probed."""
    x = clustered(4000, seed=2)
    index = VectorIndex.build(DIM, np.arange(1, 3001), x[:3000], PARAMS)
    plain = faiss.clone_index(index.index)
    assigning, gate = threading.Event(), threading.Event()
    kind = type(index.index.quantizer)  # a new proxy on each access: patch its class
    real_search = kind.search

    def held(self: object, *args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "adder":
            assigning.set()
            assert gate.wait(30)
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(kind, "search", held)
    adder = threading.Thread(target=index.add, args=(np.arange(3001, 4001), x[3000:]), name="adder")
    adder.start()
    assert assigning.wait(10)
    stop, done = threading.Event(), []  # type: ignore[var-annotated]
    searcher = threading.Thread(target=searching, args=(index, clustered(4, seed=3), stop, done))
    searcher.start()
    time.sleep(0.3)
    assert len(done) > 5, f"only {len(done)} searches finished during the list assignment"
    gate.set()
    adder.join(10)
    stop.set()
    searcher.join(10)
    plain.add_with_ids(x[3000:], np.arange(3001, 4001))
    for i in range(index.index.nlist):
        got = faiss.rev_swig_ptr(index.index.invlists.get_ids(i), index.index.invlists.list_size(i))
        want = faiss.rev_swig_ptr(plain.invlists.get_ids(i), plain.invlists.list_size(i))
        assert np.array_equal(np.sort(got), np.sort(want)), f"list {i}"
    q = clustered(10, seed=4)
    _, found = index.search(q, 10, nprobe=index.index.nlist)
    assert np.array_equal(found, brute(x, np.arange(1, 4001), q, 10))

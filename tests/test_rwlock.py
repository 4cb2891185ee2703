"""The index's readers-writer lock under randomized contention: never a writer beside anyone, and
neither side starved by the other taking the lock over and over."""

from __future__ import annotations

import threading
import time

import numpy as np

from index.rwlock import ReadWriteLock


def test_random_readers_and_writers_never_overlap_a_writer() -> None:
    """Injects 10 seeded trials of 6 readers and 3 writers, each taking the lock 40 times with random
    holds of 0-1 ms: a shared count checked inside every hold never sees a writer beside another
    holder, and every thread finishes (no deadlock)."""
    for trial in range(10):
        lock, state, errors = ReadWriteLock(), {"readers": 0, "writers": 0}, []
        guard = threading.Lock()

        def run(seed: int, write: bool, lock: ReadWriteLock = lock, state: dict[str, int] = state,
                errors: list[str] = errors, guard: threading.Lock = guard) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(40):
                with lock.write() if write else lock.read():
                    with guard:
                        state["writers" if write else "readers"] += 1
                        if state["writers"] > 1 or (state["writers"] and state["readers"]):
                            errors.append(f"seed {seed}: {state}")
                    time.sleep(float(rng.uniform(0, 0.001)))
                    with guard:
                        state["writers" if write else "readers"] -= 1

        threads = [threading.Thread(target=run, args=(trial * 100 + i, i < 3)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), f"trial {trial}: deadlock"
        assert not errors, errors[:3]


def test_a_writer_retaking_the_lock_lets_waiting_readers_in_between() -> None:
    """A writer takes the lock 50 times in a row (a mutation in slices) while a reader loops: the
    reader gets in between the writer's holds, not only after the last one."""
    lock, writing, reads_during = ReadWriteLock(), threading.Event(), []

    def reader() -> None:
        writing.wait()
        while writing.is_set():
            with lock.read():
                reads_during.append(writing.is_set())

    thread = threading.Thread(target=reader)
    thread.start()
    writing.set()
    for _ in range(50):
        with lock.write():
            time.sleep(0.002)
    writing.clear()
    thread.join()
    assert sum(reads_during) >= 10, f"only {sum(reads_during)} reads during 50 writes"

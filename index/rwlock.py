"""A readers-writer lock: many searches at once, or one mutation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ReadWriteLock"]


class ReadWriteLock:
    """Shared for readers, exclusive for a writer. A waiting writer holds back new readers, so a
    steady stream of searches cannot starve a mutation; and a writer releasing the lock lets the
    readers then waiting in before the next writer, so a mutation taken in slices (a graph's add)
    cannot starve searches either. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admit = 0  # readers to let in before the next writer: those waiting at the last release

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writing or (self._writers_waiting and not self._admit):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._admit = max(0, self._admit - 1)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers or self._admit:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._admit = self._readers_waiting
                self._cond.notify_all()

"""Query texts to vectors under load: a cache of recent texts, and concurrent misses encoded
together in one model call.

Each search runs in a worker thread. A thread whose text is not cached queues it and, if no other
thread is encoding, becomes the encoder: it waits ``window`` seconds for concurrent requests to
join, takes up to ``max_batch`` queued texts, encodes them in one call under the model lock and
hands every waiter its row. Threads whose text is already queued or being encoded wait for that
result instead of encoding it again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager

import numpy as np

__all__ = ["TextQueries"]


class TextQueries:
    def __init__(self, encode: Callable[[list[str]], np.ndarray], model_lock: AbstractContextManager[object],
                 size: int = 4096, window: float = 0.003, max_batch: int = 64) -> None:
        """``encode``: texts -> [n, dim] rows (one model call); ``size``: texts cached (least
        recently used dropped first); ``window``: seconds an encoder waits for others to join."""
        self._encode, self._model_lock = encode, model_lock
        self.size, self.window, self.max_batch = size, window, max_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pending: list[str] = []
        self._inflight: dict[str, Future[np.ndarray]] = {}
        self._encoding = False
        self._cv = threading.Condition()
        self.calls = 0  # model calls made (for tests and benches)

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] rows, from the cache or a (shared) model call."""
        futures: list[Future[np.ndarray]] = []
        with self._cv:
            for text in texts:
                cached = self._cache.get(text)
                future: Future[np.ndarray] = Future()
                if cached is not None:
                    self._cache.move_to_end(text)
                    future.set_result(cached)
                elif text in self._inflight:
                    future = self._inflight[text]
                else:
                    self._inflight[text] = future
                    self._pending.append(text)
                futures.append(future)
        self._wait(futures)
        return np.stack([f.result() for f in futures])

    def _wait(self, futures: list[Future[np.ndarray]]) -> None:
        while not all(f.done() for f in futures):
            with self._cv:
                if self._encoding or not self._pending:
                    self._cv.wait(0.05)  # woken when a batch is done
                    continue
                self._encoding = True
            try:
                time.sleep(self.window)  # let concurrent requests join this batch
                with self._cv:
                    batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                self._run(batch)
            finally:
                with self._cv:
                    self._encoding = False
                    self._cv.notify_all()

    def _run(self, batch: list[str]) -> None:
        if not batch:
            return
        try:
            with self._model_lock:
                rows = np.asarray(self._encode(batch), dtype=np.float32)
            self.calls += 1
        except BaseException as err:  # every waiter of this batch gets the error, none hangs
            with self._cv:
                for text in batch:
                    self._inflight.pop(text).set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        with self._cv:
            for text, row in zip(batch, rows, strict=True):
                self._cache[text] = row
                self._inflight.pop(text).set_result(row)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)

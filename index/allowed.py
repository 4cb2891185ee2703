"""Allowed-id sets of search filters, from SQL, cached per (index, generation, filter)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from index.filters import Filters, filtered_ids

__all__ = ["AllowedCache"]


class AllowedCache:
    """The embedding ids a filter allows, read once from SQL (indexed columns: dataset, tags,
    dates; metadata by JSON path) and kept until the index changes. Images, their tags and their
    metadata are written once; what changes is which embeddings exist, and every such change gives
    the loaded index a new ``generation``, so an entry of an older generation is never used."""

    def __init__(self, sessions: sessionmaker[Session], size: int = 64) -> None:
        self.sessions = sessions
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # SQL reads made (for tests and benches)

    def get(self, model_version_id: int, kind: str, generation: int, filters: Filters) -> np.ndarray:
        """Sorted unique ids ``filters`` allow among the (model version, kind) embeddings."""
        key = (model_version_id, kind, generation,
               json.dumps([sorted(filters.dataset_ids), sorted(filters.tags), filters.meta,
                           filters.created_after, filters.created_before], sort_keys=True, default=str))
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        with self.sessions() as session:
            allowed = np.unique(np.array(session.scalars(filtered_ids(model_version_id, kind, filters)).all(),
                                         np.int64))
        with self._lock:
            self.misses += 1
            self._entries[key] = allowed
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return allowed

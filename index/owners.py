"""Embedding id -> image id of one loaded index, in memory."""

from __future__ import annotations

import numpy as np


class Owners:
    """Embedding id -> image id of one index, in memory: image hits need no SQL round trip.
    Holds exactly the ids in the index, so it also answers "is this id indexed?". Both arrays are
    replaced together (one attribute), so a search reading them while a catch-up writes sees
    either the old pair or the new one."""

    def __init__(self, ids: np.ndarray, image_ids: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self._pair = (np.asarray(ids, np.int64)[order], np.asarray(image_ids, np.int64)[order])

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, image ids), sorted by id: one consistent snapshot."""
        return self._pair

    @property
    def ids(self) -> np.ndarray:
        return self._pair[0]

    @property
    def image_ids(self) -> np.ndarray:
        return self._pair[1]

    def add(self, ids: np.ndarray, image_ids: np.ndarray) -> None:
        ids, image_ids = np.asarray(ids, np.int64), np.asarray(image_ids, np.int64)
        if not len(ids):
            return
        have, owners = self._pair
        if not len(have) or (ids.min() > have[-1] and np.all(np.diff(ids) > 0)):
            # new rows have the largest ids (never reused): append, no re-sort
            self._pair = (np.concatenate([have, ids]), np.concatenate([owners, image_ids]))
            return
        self._pair = Owners(np.concatenate([have, ids]), np.concatenate([owners, image_ids]))._pair

    def remove(self, ids: np.ndarray) -> None:
        have, owners = self._pair
        keep = ~np.isin(have, ids)
        self._pair = (have[keep], owners[keep])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.lookup(ids, missing=None) >= 0)

    def lookup(self, ids: np.ndarray, missing: int | None = -1) -> np.ndarray:
        """Image id of each embedding id; -1 where unknown (``missing=None``: the positions, for
        ``contains``)."""
        have, owners = self._pair
        if not len(have):
            return np.full(np.shape(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(have, ids), len(have) - 1)  # no copies: O(k log n)
        return np.where(have[pos] == ids, pos if missing is None else owners[pos], -1)

"""Id -> position lookups for the replay's hot loop (catalog rows, popularity ranks).

`IdIndex(ids)` answers "where is each of these ids in `ids`" for arrays of any shape: one
gather from a dense table indexed by id when the ids are compact (the usual case: ids are
0..n-1 or close), else a binary search over the sorted ids. Ids absent from `ids` (PAD,
unknown items) get -1.
"""

from __future__ import annotations

import numpy as np

DENSE_SLACK = 8
"""A dense table is built when the largest id is at most DENSE_SLACK x len(ids) + 2**20."""


class IdIndex:
    """Positions of ids in a fixed array of distinct int64 ids."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"IdIndex: ids must be 1-d, got shape {ids.shape}")
        self.ids = ids
        self._table = None
        if len(ids) and ids.min() >= 0 and ids.max() <= DENSE_SLACK * len(ids) + (1 << 20):
            # slot id + 1 holds the position; slot 0 and the last slot hold -1, so clipping
            # sends every negative id and every id past the largest to a miss
            table = np.full(int(ids.max()) + 3, -1, dtype=np.int64)
            table[ids + 1] = np.arange(len(ids))
            self._table = table
        else:
            self._order = np.argsort(ids, kind="stable")
            self._sorted = ids[self._order]

    def positions(self, query: np.ndarray) -> np.ndarray:
        """Position in `ids` of each query id (same shape), -1 where it is not there."""
        query = np.asarray(query, dtype=np.int64)
        if self._table is not None:
            return np.take(self._table, query + 1, mode="clip")
        if not len(self.ids):
            return np.full(query.shape, -1, dtype=np.int64)
        at = np.searchsorted(self._sorted, query).clip(max=len(self.ids) - 1)
        return np.where(self._sorted[at] == query, self._order[at], -1)

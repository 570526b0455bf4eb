"""Baseline stacks the simulator is built and tested with: popularity and random.

Both implement `quasid.core.recommender.Recommender` and are row-wise deterministic (a
request's slate depends on its own history and user only), like every stack must be.
"""

from __future__ import annotations

import numpy as np

from quasid.core.hashing import mix64
from quasid.core.slates import check_k, first_unique
from simulator.lookup import IdIndex


class PopularityRecommender:
    """The most-interacted items of the training logs first, minus the request's history.

    Deterministic (ties broken by item id); a row's slate depends on its own history only.
    If fewer than `k` unseen items remain, seen items fill the slate.
    """

    def __init__(self, item_ids: np.ndarray, counts: np.ndarray, name: str = "popularity"):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.float64)
        if item_ids.shape != counts.shape or item_ids.ndim != 1 or not len(item_ids):
            raise ValueError(f"PopularityRecommender: item_ids {item_ids.shape} and counts "
                             f"{counts.shape} must be equal-length non-empty 1-d arrays")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("PopularityRecommender: item_ids repeat")
        order = np.lexsort((item_ids, -counts))
        self.name = name
        self.ranked = item_ids[order]
        total = counts.sum()
        self.scores = (counts[order] / total if total > 0 else counts[order]).astype(np.float32)
        self._rank = IdIndex(self.ranked)

    @classmethod
    def fit(cls, catalog: np.ndarray, interacted: np.ndarray, name: str = "popularity"
            ) -> PopularityRecommender:
        """Rank `catalog` item ids by how often they occur in `interacted` (training logs)."""
        catalog = np.asarray(catalog, dtype=np.int64)
        ids, counts = np.unique(np.asarray(interacted, dtype=np.int64), return_counts=True)
        pos = np.searchsorted(ids, catalog).clip(max=max(len(ids) - 1, 0))
        hit = (ids[pos] == catalog) if len(ids) else np.zeros(len(catalog), dtype=bool)
        return cls(catalog, np.where(hit, counts[pos] if len(ids) else 0, 0), name=name)

    def recommend(self, histories: np.ndarray, k: int, users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` popular items not in each row's history."""
        check_k(k, len(self.ranked), self.name)
        histories = np.asarray(histories, dtype=np.int64)
        n, h = histories.shape
        m = min(len(self.ranked), k + h)  # k unseen items are among these
        top = self.ranked[:m]
        # Mark seen candidates by each history item's popularity rank (n x H lookups,
        # rather than comparing n x m x H pairs); PAD and unknown ids have no rank.
        rank = self._rank.positions(histories).ravel()
        hits = np.flatnonzero(rank.view(np.uint64) < m)  # misses (-1) view as huge
        seen = np.zeros((n, m), dtype=bool)
        seen[hits // h, rank[hits]] = True
        if m - h >= k:
            # at most h of the m are seen, so every row has k unseen: its first k, in rank
            # order; rows that saw none of the top m (most) simply take the first k
            pick = np.broadcast_to(np.arange(k), (n, k)).copy()
            dirty = np.flatnonzero(seen.any(axis=1))
            unseen = ~seen[dirty]
            first = unseen & (np.cumsum(unseen, axis=1, dtype=np.int32) <= k)
            pick[dirty] = (np.flatnonzero(first) % m).reshape(len(dirty), k)
        else:
            # unseen first in rank order; where fewer than k are unseen, seen items fill in
            pick = np.argsort(seen, axis=1, kind="stable")[:, :k]
        return top[pick], self.scores[:m][pick]


class RandomRecommender:
    """Uniformly random distinct items from the catalog.

    The draw is keyed on (seed, user, history row) through `mix64`, not on a generator's
    state, so a request's slate is the same whatever batch or process it is served in.
    """

    def __init__(self, item_ids: np.ndarray, seed: int = 0, name: str = "random"):
        self.item_ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        if not len(self.item_ids):
            raise ValueError("RandomRecommender: empty catalog")
        self.seed = int(seed)
        self.name = name

    def recommend(self, histories: np.ndarray, k: int, users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """`k` distinct random items per row, ordered by their (uniform) scores."""
        n_items = len(self.item_ids)
        check_k(k, n_items, self.name)
        histories = np.asarray(histories, dtype=np.int64)
        key = mix64(np.full(len(histories), self.seed, dtype=np.uint64))
        if users is not None:
            key = mix64(key ^ np.asarray(users).astype(np.uint64))
        for col in range(histories.shape[1]):
            key = mix64(key ^ histories[:, col].astype(np.uint64))
        m = 2 * k
        while True:
            draws = mix64(key[:, None] ^ mix64(np.arange(m, dtype=np.uint64))[None, :])
            cand = (draws % np.uint64(n_items)).astype(np.int64)
            pick = first_unique(cand, k)
            if (pick >= 0).all() or m >= 64 * n_items:
                break
            m *= 2  # rows with too many repeats (tiny catalogs) draw more
        if (pick < 0).any():
            raise ValueError(f"{self.name}: could not draw {k} distinct items from {n_items}")
        items = self.item_ids[np.take_along_axis(cand, pick, axis=1)]
        u = (np.take_along_axis(draws, pick, axis=1) >> np.uint64(11)).astype(np.float64) / 2**53
        order = np.argsort(-u, axis=1, kind="stable")  # slate order = descending score
        return (np.take_along_axis(items, order, axis=1),
                np.take_along_axis(u, order, axis=1).astype(np.float32))

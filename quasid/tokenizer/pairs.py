"""Collaborative positives: item pairs co-interacted within a window of the training logs.

`collaborative_pairs` finds them with polars (one shifted column per window offset, no
per-user loops); `PairIndex` holds them on the training device for two uses: the B × B
positive mask P of a batch (CVPM's exclusion and the contrastive candidates) and drawing a
collaborative partner for an anchor item (the batch sampler).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


def collaborative_pairs(interactions: pl.DataFrame, window: int = 3, min_count: int = 1
                        ) -> pl.DataFrame:
    """Unordered pairs (item_a < item_b) that one user touched within `window` positions.

    Each user's interactions are put in time order (ties by item id); item t pairs with the
    items at positions t+1 .. t+window. Returns columns item_a, item_b, count (co-occurrences
    over all users), only pairs with count >= min_count, sorted by (item_a, item_b).
    Pass TRAINING interactions only: a pair seen only after the cutoff is no training signal.
    """
    if window < 1:
        raise ValueError(f"collaborative_pairs: window must be >= 1, got {window}")
    missing = {"user_id", "item_id", "ts"} - set(interactions.columns)
    if missing:
        raise ValueError(f"collaborative_pairs: interactions lack column(s) {sorted(missing)}")
    ordered = interactions.sort(["user_id", "ts", "item_id"])
    item = pl.col("item_id")
    shifted = pl.concat([
        ordered.select(a=item, b=item.shift(-k).over("user_id")) for k in range(1, window + 1)
    ])
    return (
        shifted.drop_nulls()
        .filter(pl.col("a") != pl.col("b"))
        .select(item_a=pl.min_horizontal("a", "b"), item_b=pl.max_horizontal("a", "b"))
        .group_by("item_a", "item_b").len("count")
        .filter(pl.col("count") >= min_count)
        .with_columns(pl.col("count").cast(pl.Int64))
        .sort("item_a", "item_b")
    )


def pairs_to_rows(pairs: pl.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """(n, 2) int64 row indices into `item_ids` of the pairs; pairs naming other items drop."""
    index = pl.DataFrame({"item": np.asarray(item_ids, dtype=np.int64),
                          "row": np.arange(len(item_ids), dtype=np.int64)})
    rows = (
        pairs.select("item_a", "item_b")
        .join(index.rename({"item": "item_a", "row": "row_a"}), on="item_a", how="inner")
        .join(index.rename({"item": "item_b", "row": "row_b"}), on="item_b", how="inner")
        .sort("row_a", "row_b")
    )
    return rows.select("row_a", "row_b").to_numpy().astype(np.int64).reshape(-1, 2)


class PairIndex:
    """Positive pairs over `n` rows, on one device: a sorted key array and a CSR partner list."""

    def __init__(self, rows: np.ndarray, n: int, device: str | torch.device = "cpu"):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"PairIndex: pair rows must lie in [0, {n}), got min {rows.min()} "
                             f"max {rows.max()}")
        rows = rows[rows[:, 0] != rows[:, 1]]
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        keys = np.unique(lo * n + hi)
        lo, hi = keys // n, keys % n
        self.n = n
        self.device = torch.device(device)
        self.keys = torch.from_numpy(keys).to(self.device)
        # partners in both directions, grouped by row (CSR), for drawing a partner on the CPU
        src = np.concatenate([lo, hi])
        dst = np.concatenate([hi, lo])
        order = np.lexsort((dst, src))
        self.partners = torch.from_numpy(dst[order])
        degree = np.bincount(src, minlength=n)
        self.indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(degree)]))

    def __len__(self) -> int:
        return int(self.keys.numel())

    def degree(self) -> torch.Tensor:
        """(n,) number of positive partners per row (CPU)."""
        return self.indptr[1:] - self.indptr[:-1]

    def mask(self, rows: torch.Tensor) -> torch.Tensor:
        """P (B, B) bool: P_ij = 1 when rows[i] and rows[j] are a positive pair."""
        lo = torch.minimum(rows[:, None], rows[None, :])
        hi = torch.maximum(rows[:, None], rows[None, :])
        query = lo * self.n + hi
        if self.keys.numel() == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, query).clamp_max(self.keys.numel() - 1)
        return self.keys[pos] == query

    def contains(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Whether each (a[t], b[t]) is a positive pair (either order): bool, a's shape."""
        if self.keys.numel() == 0:
            return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        query = torch.minimum(a, b) * self.n + torch.maximum(a, b)
        pos = torch.searchsorted(self.keys, query.reshape(-1)).clamp_max(self.keys.numel() - 1)
        return (self.keys[pos] == query.reshape(-1)).reshape(query.shape)

    def draw_partner(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniformly drawn positive partner per row (CPU int64); -1 where a row has none."""
        start = self.indptr[rows]
        deg = self.indptr[rows + 1] - start
        u = torch.rand(rows.shape, generator=generator, dtype=torch.float64)
        offset = (u * deg).long().clamp_max((deg - 1).clamp_min(0))
        pick = self.partners[(start + offset).clamp_max(max(len(self.partners) - 1, 0))] \
            if len(self.partners) else torch.full_like(rows, -1)
        return torch.where(deg > 0, pick, torch.full_like(rows, -1))

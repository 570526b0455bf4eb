"""A first-order transition baseline: the items that most often followed the request's last item.

`TransitionRecommender.fit` counts, in the training logs, how often item b directly follows
item a in a user's time-ordered interactions (polars, no per-user loops) and keeps each
item's `successors` most frequent followers. A request is served from its newest history
items: the followers of the last item by count, then those of the one before, up to
`backoff` items back, then the most popular items; never an item of the history (unless the
history holds nearly every training item: then its items fill the slate last), never one
twice. It learns nothing and needs no device: the floor of the offline tables (issue 15),
since whatever a trained retriever learns about the last item's transitions, counting
gets for free. Measured on Beauty and Toys in benchmarks/README.md ("Model-free baselines").
"""

from __future__ import annotations

import numpy as np
import polars as pl

from quasid.core.recommender import PAD
from quasid.core.slates import check_k, first_unique, row_isin

NAME = "transition"


class TransitionRecommender:
    """Followers of the newest history items by transition count, then popularity.

    `sources` (m,) sorted item ids with followers; `followers` (m, S) their most frequent
    followers in order (PAD where fewer), `shares` (m, S) each follower's share of its
    source's transitions; `popular` all training items by count (ties by id), `popular_share`
    their share of the interactions. Scores: backoff level l (0 = the last item) gives
    `backoff - l + share`, popularity `share` (< 1), so a slate's scores never increase.
    """

    name = NAME

    def __init__(self, sources: np.ndarray, followers: np.ndarray, shares: np.ndarray,
                 popular: np.ndarray, popular_share: np.ndarray, backoff: int):
        if backoff < 1:
            raise ValueError(f"TransitionRecommender: backoff must be >= 1, got {backoff}")
        if not len(popular):
            raise ValueError("TransitionRecommender: no training interactions to count")
        self.sources, self.followers, self.shares = sources, followers, shares
        self.popular, self.popular_share = popular, popular_share
        self.backoff = backoff

    @classmethod
    def fit(cls, train: pl.DataFrame, successors: int = 50, backoff: int = 3
            ) -> TransitionRecommender:
        """Count `train`'s (user_id, item_id, ts) transitions; keep `successors` per item."""
        missing = {"user_id", "item_id", "ts"} - set(train.columns)
        if missing:
            raise ValueError(f"TransitionRecommender.fit: train lacks column(s) {sorted(missing)}")
        if successors < 1:
            raise ValueError(f"TransitionRecommender.fit: successors must be >= 1, got "
                             f"{successors}")
        pairs = (
            train.sort(["user_id", "ts", "item_id"])
            .select(src="item_id", dst=pl.col("item_id").shift(-1).over("user_id"))
            .drop_nulls()
            .group_by("src", "dst").len("count")
            .with_columns(share=pl.col("count") / pl.col("count").sum().over("src"))
            .sort(["src", "count", "dst"], descending=[False, True, False])
            .group_by("src", maintain_order=True).head(successors)
            .with_columns(slot=pl.int_range(pl.len()).over("src"))
        )
        sources = pairs["src"].unique(maintain_order=True).to_numpy().astype(np.int64)
        row = np.searchsorted(sources, pairs["src"].to_numpy())
        slot = pairs["slot"].to_numpy()
        followers = np.full((len(sources), successors), PAD, dtype=np.int64)
        shares = np.zeros((len(sources), successors), dtype=np.float32)
        followers[row, slot] = pairs["dst"].to_numpy()
        shares[row, slot] = pairs["share"].to_numpy()
        counts = (train.group_by("item_id").len("count")
                  .sort(["count", "item_id"], descending=[True, False]))
        popular = counts["item_id"].to_numpy().astype(np.int64)
        share = (counts["count"] / counts["count"].sum()).to_numpy().astype(np.float32)
        return cls(sources, followers, shares, popular, share, backoff)

    def recommend(self, histories: np.ndarray, k: int, users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` followers of each row's newest history items, then popular items, none
        of them in the row's history (see the module docstring)."""
        check_k(k, len(self.popular), self.name)
        histories = np.asarray(histories, dtype=np.int64)
        n, h = histories.shape
        newest = histories[:, ::-1][:, :self.backoff]  # newest first (PAD: no followers)
        levels = newest.shape[1]
        if len(self.sources):
            pos = np.searchsorted(self.sources, newest).clip(max=len(self.sources) - 1)
            known = (self.sources[pos] == newest) & (newest != PAD)
            follow = np.where(known[:, :, None], self.followers[pos], PAD)  # (n, levels, S)
            score = np.where(known[:, :, None], self.shares[pos]
                             + (self.backoff - np.arange(levels))[None, :, None], 0.0)
        else:  # no user with two training interactions: popularity alone
            follow = np.full((n, levels, self.followers.shape[1]), PAD, dtype=np.int64)
            score = np.zeros(follow.shape)
        m = min(len(self.popular), k + h)  # k unseen popular items are among these
        cand = np.concatenate([follow.reshape(n, -1),
                               np.broadcast_to(self.popular[:m], (n, m))], axis=1)
        cand_score = np.concatenate([score.reshape(n, -1),
                                     np.broadcast_to(self.popular_share[:m], (n, m))], axis=1)
        seen = row_isin(cand, histories, PAD)
        pick = first_unique(cand, k, (cand != PAD) & ~seen)
        items = np.take_along_axis(cand, pick, axis=1)
        scores = np.take_along_axis(cand_score, pick, axis=1)
        short = np.flatnonzero((pick < 0).any(axis=1))
        if len(short):
            # the history holds nearly every training item: its items fill the slate after
            # the unseen ones, scored -1 (under every unseen item's score); all training
            # items are candidates then (m = their count), so k distinct ones exist
            order = np.argsort(seen[short], axis=1, kind="stable")
            cand_s = np.take_along_axis(cand[short], order, axis=1)
            seen_s = np.take_along_axis(seen[short], order, axis=1)
            score_s = np.where(seen_s, -1.0,
                               np.take_along_axis(cand_score[short], order, axis=1))
            fill = first_unique(cand_s, k, cand_s != PAD)
            items[short] = np.take_along_axis(cand_s, fill, axis=1)
            scores[short] = np.take_along_axis(score_s, fill, axis=1)
        return items, scores.astype(np.float32)

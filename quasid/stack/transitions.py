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

`FollowerTable` holds the same counts over a SID stack's item rows (torch, on the stack's
device): the stack takes the followers as candidates and their smoothed transition log
probability as a score feature, its weight fitted on validation (`quasid.stack.serving`).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch

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
        sources, followers, follower_n, totals = follower_counts(train, successors)
        # in float64 then rounded, as polars' share was
        shares = (follower_n.astype(np.float64) / totals[:, None]).astype(np.float32)
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


def follower_counts(train: pl.DataFrame, successors: int = 50
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count `train`'s (user_id, item_id, ts) transitions (item b directly after item a in a
    user's time order; polars, no per-user loops).

    Returns (sources (m,) sorted item ids with at least one follower, followers (m, S) each
    source's `successors` most frequent followers by count then id (PAD where fewer), their
    counts (m, S) float32 (0 where PAD), totals (m,) all of the source's transitions, the
    ones beyond S included).
    """
    missing = {"user_id", "item_id", "ts"} - set(train.columns)
    if missing:
        raise ValueError(f"transition counts: train lacks column(s) {sorted(missing)}")
    if successors < 1:
        raise ValueError(f"transition counts: successors must be >= 1, got {successors}")
    pairs = (
        train.sort(["user_id", "ts", "item_id"])
        .select(src="item_id", dst=pl.col("item_id").shift(-1).over("user_id"))
        .drop_nulls()
        .group_by("src", "dst").len("count")
        .with_columns(total=pl.col("count").sum().over("src"))
        .sort(["src", "count", "dst"], descending=[False, True, False])
        .group_by("src", maintain_order=True).head(successors)
        .with_columns(slot=pl.int_range(pl.len()).over("src"))
    )
    src = pairs["src"].to_numpy().astype(np.int64)
    sources, first = np.unique(src, return_index=True)
    row = np.searchsorted(sources, src)
    slot = pairs["slot"].to_numpy()
    followers = np.full((len(sources), successors), PAD, dtype=np.int64)
    counts = np.zeros((len(sources), successors), dtype=np.float32)
    followers[row, slot] = pairs["dst"].to_numpy()
    counts[row, slot] = pairs["count"].to_numpy()
    totals = pairs["total"].to_numpy()[first].astype(np.float32)
    return sources, followers, counts, totals


class FollowerTable:
    """Transition counts over item rows, as the SID stack's candidate source and score feature.

    For a request with newest history rows h_0 (the last), h_1, ..., h_{L-1} (L = `backoff`),
    the transition probability of an item b is an interpolated back-off estimate:

        p_T(b | h) = (sum_l decay**l * c(h_l, b) + prior * q(b)) / (sum_l decay**l * N(h_l) + prior)

    with c(a, b) the training count of b directly after a (the `successors` most frequent b
    per a; rarer followers count as 0), N(a) all of a's transitions and q the add-one
    smoothed popularity (every item, cold ones included, gets a finite log p_T). The sums
    run over a request's followers with one sort and two binary searches per row, no
    (request x candidate x follower) comparison.
    """

    def __init__(self, followers: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor,
                 prior: torch.Tensor, backoff: int = 3, decay: float = 0.5,
                 prior_weight: float = 1.0):
        """followers (n_items, S) rows (PAD where fewer), counts (n_items, S), totals
        (n_items,), prior (n_items,) probabilities q."""
        if backoff < 1 or not 0 < decay <= 1 or prior_weight <= 0:
            raise ValueError(f"FollowerTable: expected backoff >= 1, 0 < decay <= 1 and "
                             f"prior_weight > 0, got {backoff}, {decay}, {prior_weight}")
        self.followers, self.counts, self.totals = followers, counts.float(), totals.float()
        self.prior = prior.float()
        self.backoff, self.decay, self.prior_weight = backoff, decay, prior_weight

    @classmethod
    def from_interactions(cls, train: pl.DataFrame, rows_of, popularity: np.ndarray,
                          successors: int = 50, **kwargs) -> FollowerTable:
        """Count `train`'s transitions; `rows_of` maps item ids to the stack's rows,
        `popularity` (n_items,) is `train`'s interaction count per row."""
        n_items = len(popularity)
        sources, followers, counts, totals = follower_counts(train, successors)
        table = np.full((n_items, successors), PAD, dtype=np.int64)
        table_counts = np.zeros((n_items, successors), dtype=np.float32)
        table_totals = np.zeros(n_items, dtype=np.float32)
        if len(sources):
            src = rows_of(sources)
            table[src] = rows_of(followers)
            table_counts[src], table_totals[src] = counts, totals
        prior = (popularity + 1) / (popularity.sum() + n_items)
        return cls(torch.as_tensor(table), torch.as_tensor(table_counts),
                   torch.as_tensor(table_totals), torch.as_tensor(prior), **kwargs)

    @classmethod
    def from_config(cls, train: pl.DataFrame, rows_of, popularity: np.ndarray, cfg
                    ) -> FollowerTable:
        """`from_interactions` with the counting settings of a
        `quasid.stack.config.TransitionConfig` (successors, backoff, decay, prior)."""
        return cls.from_interactions(train, rows_of, popularity, cfg.successors,
                                     backoff=cfg.backoff, decay=cfg.decay, prior_weight=cfg.prior)

    def to(self, device) -> FollowerTable:
        """This table on `device`."""
        return FollowerTable(*(t.to(device) for t in (self.followers, self.counts, self.totals,
                                                      self.prior)),
                             self.backoff, self.decay, self.prior_weight)

    def state_dict(self) -> dict:
        """The tensors and settings, for `torch.save` (CPU)."""
        return {"followers": self.followers.cpu(), "counts": self.counts.cpu(),
                "totals": self.totals.cpu(), "prior": self.prior.cpu(),
                "settings": torch.tensor([self.backoff, self.decay, self.prior_weight],
                                         dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> FollowerTable:
        """Read back what `state_dict` gave."""
        backoff, decay, prior_weight = state["settings"].tolist()
        return cls(state["followers"], state["counts"], state["totals"], state["prior"],
                   int(backoff), decay, prior_weight)

    def request(self, histories: torch.Tensor) -> RequestFollowers:
        """The followers of a batch of left-padded row histories (B, H), sorted per row."""
        newest = histories.flip(1)[:, :self.backoff]
        known = newest >= 0
        rows = newest.clamp(min=0)
        decay = self.decay ** torch.arange(newest.shape[1], device=newest.device, dtype=torch.float32)
        level = torch.where(known, decay, 0.0)  # (B, L)
        follow = torch.where(known[..., None], self.followers[rows], PAD).flatten(1)
        weight = (level[..., None] * self.counts[rows]).flatten(1)
        follow, order = follow.sort(dim=1)
        cumulative = torch.cat([torch.zeros_like(weight[:, :1]),
                                weight.gather(1, order).cumsum(1)], dim=1)
        log_norm = torch.log((level * self.totals[rows]).sum(1) + self.prior_weight)
        return RequestFollowers(follow, cumulative, log_norm, self)


class RequestFollowers:
    """One batch's sorted followers (B, J), their cumulative weighted counts (B, J + 1) and
    the log of each request's normalizer (B,): what `FollowerTable.request` returns."""

    def __init__(self, follow: torch.Tensor, cumulative: torch.Tensor, log_norm: torch.Tensor,
                 table: FollowerTable):
        self.follow, self.cumulative, self.log_norm, self.table = follow, cumulative, log_norm, table

    def counted(self, rows: torch.Tensor) -> torch.Tensor:
        """sum_l decay**l * c(h_l, b) for item rows b (B, N) (0 for PAD and unseen followers)."""
        rows = rows.contiguous()
        left = torch.searchsorted(self.follow, rows, right=False)
        right = torch.searchsorted(self.follow, rows, right=True)
        found = self.cumulative.gather(1, right) - self.cumulative.gather(1, left)
        return torch.where(rows >= 0, found, 0.0)

    def log_p(self, rows: torch.Tensor) -> torch.Tensor:
        """log p_T(b | history) of item rows (B, N) (PAD rows: the prior of row 0, unused)."""
        table = self.table
        prior = table.prior_weight * table.prior[rows.clamp(min=0)]
        return torch.log(self.counted(rows) + prior) - self.log_norm[:, None]

    def log_p_all(self, n_items: int) -> torch.Tensor:
        """log p_T(b | history) of every item row b: (B, n_items), what `log_p` gives for
        rows 0 .. n_items - 1, by one scatter of the followers' counts (no search)."""
        table = self.table
        weight = self.cumulative.diff(dim=1)  # each sorted follower's weighted count
        slot = torch.where(self.follow >= 0, self.follow, n_items)  # PAD: an extra column
        counted = torch.zeros(len(slot), n_items + 1, dtype=weight.dtype, device=weight.device)
        counted = counted.scatter_add_(1, slot, weight)[:, :n_items]
        prior = table.prior_weight * table.prior[:n_items]
        return torch.log(counted + prior) - self.log_norm[:, None]

    def top(self, m: int) -> torch.Tensor:
        """The `m` followers with the largest weighted counts per request (B, m), distinct,
        best first (ties: smaller row first), PAD where fewer."""
        follow = self.follow
        first = torch.ones_like(follow, dtype=torch.bool)
        first[:, 1:] = follow[:, 1:] != follow[:, :-1]
        score = torch.where(first & (follow >= 0), self.counted(follow), -math.inf)
        m = min(m, follow.shape[1])
        # stable descending sort on the row-sorted followers: ties keep the smaller row first
        order = score.argsort(dim=1, descending=True, stable=True)[:, :m]
        best = score.gather(1, order)
        return torch.where(torch.isfinite(best), follow.gather(1, order), PAD)

"""Interaction logs as sequences: each interaction with the user's history before it.

The one way histories are built: `user_starts` + `window_histories` gather each row's
previous items into a left-padded matrix (PAD = -1, newest last), vectorized over all
users. On top: `sequence_windows` (every interaction), `training_windows` (the stacks'
training pairs), `loo_requests` (leave-one-out test requests) and `validation_requests`
(each user's second-to-last item), plus `row_mapper` (item ids -> SID-table rows).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from quasid.core.recommender import PAD
from quasid.core.schemas import ContractError


def user_starts(users: np.ndarray) -> np.ndarray:
    """For rows sorted by user: the index of the first row of each row's user."""
    users = np.asarray(users)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    new_user = np.r_[True, users[1:] != users[:-1]]
    return np.maximum.accumulate(np.where(new_user, np.arange(len(users)), 0))


def window_histories(items: np.ndarray, start: np.ndarray, rows: np.ndarray, max_len: int
                     ) -> np.ndarray:
    """(len(rows), max_len) int64: the `max_len` items before each row within its user
    (`start` from `user_starts`), left-padded with PAD, newest last."""
    rows = np.asarray(rows, dtype=np.int64)
    idx = rows[:, None] - np.arange(max_len, 0, -1)[None, :]
    # np.take(mode="clip") folds the clip of the indices before a user's first row into the
    # gather (those slots become PAD anyway): one pass less than items[idx.clip(min=0)]
    return np.where(idx >= start[rows][:, None], np.take(items, idx, mode="clip"), PAD)


def sequence_windows(interactions: pl.DataFrame, max_len: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each interaction with the user's previous `max_len` item ids, in (ts, item_id) order.

    Returns (histories (N, max_len) left-padded with -1, newest last; target item ids (N,);
    user ids (N,); is_last (N,): the user's last interaction). Vectorized over all users.
    """
    ordered = interactions.sort(["user_id", "ts", "item_id"])
    users = ordered["user_id"].to_numpy()
    items = ordered["item_id"].to_numpy().astype(np.int64)
    n = len(items)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros((0, max_len), dtype=np.int64), empty, empty, empty.astype(bool)
    is_last = np.r_[users[1:] != users[:-1], True]
    hist = window_histories(items, user_starts(users), np.arange(n), max_len)
    return hist, items, users, is_last


def training_windows(interactions: pl.DataFrame, rows_of, max_len: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Every logged interaction after a user's first, as (history rows (N, max_len), target row (N,)).

    `rows_of` maps item ids to rows (PAD stays PAD).
    """
    hist, items, _, _ = sequence_windows(interactions, max_len)
    has_history = hist[:, -1] != PAD
    return rows_of(hist[has_history]), rows_of(items[has_history])


def row_mapper(item_ids: np.ndarray, source: str):
    """A function mapping item ids to rows of the sorted `item_ids` (PAD stays PAD).

    Unknown ids raise `ContractError` naming `source`.
    """
    def rows_of(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(item_ids, ids).clip(max=len(item_ids) - 1)
        bad = (item_ids[pos] != ids) & (ids != PAD)
        if bad.any():
            raise ContractError(f"{source}: column 'item_id': ids {np.unique(ids[bad])[:5].tolist()} "
                                f"have no SID (expected every interaction's item in the sid table)")
        return np.where(ids == PAD, PAD, pos).astype(np.int64)
    return rows_of


def loo_requests(interactions: pl.DataFrame, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(histories (n_users, max_len), targets (n_users,)): each user's last item and its past."""
    hist, items, _, is_last = sequence_windows(interactions, max_len)
    keep = is_last & (hist[:, -1] >= 0)  # a user with a single interaction has no request
    return hist[keep], items[keep]


def drop_last(interactions: pl.DataFrame) -> pl.DataFrame:
    """Each user's interactions without the last one (so the validation item becomes the last)."""
    ordered = interactions.sort(["user_id", "ts", "item_id"])
    return ordered.filter(pl.int_range(pl.len()).over("user_id") < pl.len().over("user_id") - 1)


def validation_requests(interactions: pl.DataFrame, max_len: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out validation requests: each user's second-to-last item and its past
    (never the test item), for tuning and early stopping."""
    return loo_requests(drop_last(interactions), max_len)


def sample_windows(hist: np.ndarray, tgt: np.ndarray, cap: int | None, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """At most `cap` (history, target) windows or requests: a seeded sample kept in their
    original order (all of them if `cap` is None or not smaller)."""
    if cap is None or len(tgt) <= cap:
        return hist, tgt
    keep = np.sort(np.random.default_rng(seed).choice(len(tgt), size=cap, replace=False))
    return hist[keep], tgt[keep]

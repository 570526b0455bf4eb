"""The SID stack an arm serves: generative retrieval (+ popularity fill) -> SID ranker -> top-K.

Built from one tokenizer's SID table. Per batch of requests:
1. the retriever's constrained beam search proposes `beam` items (cold items included:
   their SIDs come from content);
2. cold-start quota: items without training interactions that share their first SID
   level(s) with a beam result join (at most `cold_candidates`): the retriever, trained on
   warm targets only, gives their unseen full codes almost no probability;
3. the most popular training items not already proposed fill the candidate set up to
   `candidates` (the fallback when the beam is short, e.g. a tiny catalog);
4. every candidate is scored, p(order) * price ** price_alpha with p(order) =
   sigmoid(ranker logit + retrieval_weight * retriever log p), and the best `k` form the slate.
Everything is batched tensors on one device; item ids are mapped to rows (positions in the
SID table sorted by item id) on the way in and back on the way out.

`build_stack` trains a stack from a dataset folder and a SID table and saves it;
`Stack.load` reads it back. Training data: the interactions before `ds.cutoff_ts` when the
dataset has a cutoff, else the leave-one-out training part (cold items dropped), and then
the weight of the retriever's log p in the final score is fitted on the validation items.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from quasid.core.recommender import PAD
from quasid.core.schemas import ContractError


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
    new_user = np.r_[True, users[1:] != users[:-1]]
    is_last = np.r_[users[1:] != users[:-1], True]
    start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    idx = np.arange(n)[:, None] - np.arange(max_len, 0, -1)[None, :]
    hist = np.where(idx >= start[:, None], items[idx.clip(min=0)], PAD)
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
    from quasid.data.sequences import sequence_windows

    hist, items, _, is_last = sequence_windows(interactions, max_len)
    keep = is_last & (hist[:, -1] >= 0)  # a user with a single interaction has no request
    return hist[keep], items[keep]


def drop_last(interactions: pl.DataFrame) -> pl.DataFrame:
    """Each user's interactions without the last one (so the validation item becomes the last)."""
    ordered = interactions.sort(["user_id", "ts", "item_id"])
    return ordered.filter(pl.int_range(pl.len()).over("user_id") < pl.len().over("user_id") - 1)

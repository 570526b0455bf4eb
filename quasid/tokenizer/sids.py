"""SID assignment: the L codes of every item plus `collision_rank`, so each full ID is unique.

`collision_rank` is TIGER's extra token: among the items sharing one SID, ordered by item
id, the first gets 0, the next 1, and so on. Computed with sorts in torch (the same code on
CPU and GPU, for tens of millions of items); `sid_table` makes the SID_TABLE frame.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from quasid.core.schemas import SID_TABLE, validate

MAX_CODE = int(np.iinfo(np.int16).max)


def collision_ranks(codes: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """(n,) int64 rank of each item among the items with its SID, in item-id order.

    codes (n, L) integers, item_ids (n,) distinct. Sorted lexicographically by
    (codes, item_id) with stable sorts; an item's rank is its position minus the position
    where its SID's run starts.
    """
    n = codes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=codes.device)
    order = torch.argsort(item_ids, stable=True)
    for level in reversed(range(codes.shape[1])):
        order = order[torch.argsort(codes[order, level], stable=True)]
    ordered = codes[order]
    new_run = torch.ones(n, dtype=torch.bool, device=codes.device)
    new_run[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    position = torch.arange(n, device=codes.device)
    run_start = torch.where(new_run, position, torch.zeros_like(position)).cummax(dim=0).values
    ranks = torch.empty_like(position)
    ranks[order] = position - run_start
    return ranks


def sid_table(item_ids: np.ndarray, codes: np.ndarray, tokenizer: str) -> pl.DataFrame:
    """The SID_TABLE frame (item_id, sid, tokenizer, collision_rank), sorted by item id.

    Raises ValueError when codes do not fit int16 or a collision rank would overflow it.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != item_ids.shape[0]:
        raise ValueError(f"sid_table: codes must be (n_items, L) with n_items={len(item_ids)}, "
                         f"got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > MAX_CODE):
        raise ValueError(f"sid_table: codes must lie in [0, {MAX_CODE}] to fit int16, got "
                         f"[{codes.min()}, {codes.max()}]")
    ranks = collision_ranks(torch.tensor(codes, dtype=torch.int64),
                            torch.tensor(item_ids, dtype=torch.int64)).numpy()
    if ranks.size and ranks.max() > MAX_CODE:
        raise ValueError(f"sid_table: {ranks.max() + 1} items share one SID; collision_rank "
                         f"must fit int16 (<= {MAX_CODE})")
    frame = pl.DataFrame({
        "item_id": item_ids,
        "sid": pl.Series(codes.astype(np.int16)).cast(pl.List(pl.Int16)),
        "collision_rank": ranks.astype(np.int16),
    }).select("item_id", "sid", tokenizer=pl.lit(tokenizer, pl.String),
              collision_rank="collision_rank").sort("item_id")
    return validate(frame, SID_TABLE, source=f"sid table of tokenizer {tokenizer!r}")

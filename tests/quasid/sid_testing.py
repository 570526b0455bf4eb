"""SID tables for the stack's tests, made here so those tests do not depend on the tokenizers.

`kmeans_sid_table`: residual k-means of the items' content (a few Lloyd iterations per
level), then collision ranks in item-id order: a small, content-derived SID table like the
tokenizers write. `random_sid_table`: uniform random codes. `one_thread`: an autouse
fixture the test modules import; `torch_threads(n)`: a block with n torch threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import polars as pl
import pytest
import torch

from quasid.core.schemas import SID_TABLE, validate


def sid_table_from_codes(item_ids: np.ndarray, codes: np.ndarray, tokenizer: str) -> pl.DataFrame:
    """A SID table (contract schema) from codes; collision_rank counts earlier items with its SID."""
    order = np.lexsort((item_ids, *codes.T[::-1]))
    sorted_codes = codes[order]
    new_group = np.r_[True, (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)]
    start = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
    rank = np.empty(len(order), dtype=np.int16)
    rank[order] = np.arange(len(order)) - start
    table = pl.DataFrame({
        "item_id": pl.Series(item_ids, dtype=pl.Int64),
        "sid": pl.Series([c.tolist() for c in codes], dtype=pl.List(pl.Int16)),
        "tokenizer": tokenizer,
        "collision_rank": pl.Series(rank, dtype=pl.Int16),
    })
    return validate(table, SID_TABLE)


def kmeans_sid_table(content: np.ndarray, item_ids: np.ndarray, levels: int = 2, k: int = 8,
                     seed: int = 0, iters: int = 10) -> pl.DataFrame:
    """Residual k-means SIDs of `content` (n_items, dim)."""
    rng = np.random.default_rng(seed)
    residual = content.astype(np.float64).copy()
    codes = np.zeros((len(content), levels), dtype=np.int64)
    for level in range(levels):
        centers = residual[rng.choice(len(residual), k, replace=False)]
        for _ in range(iters):
            dist = (centers ** 2).sum(1)[None, :] - 2 * residual @ centers.T
            assign = dist.argmin(1)
            sums = np.zeros_like(centers)
            np.add.at(sums, assign, residual)
            size = np.bincount(assign, minlength=k)
            centers = np.where(size[:, None] > 0, sums / np.maximum(size, 1)[:, None], centers)
        codes[:, level] = assign
        residual -= centers[assign]
    return sid_table_from_codes(item_ids, codes, "kmeans")


def random_sid_table(item_ids: np.ndarray, levels: int = 3, k: int = 4, seed: int = 0
                     ) -> pl.DataFrame:
    """Uniformly random SIDs (collisions likely for small k)."""
    codes = np.random.default_rng(seed).integers(0, k, (len(item_ids), levels))
    return sid_table_from_codes(np.asarray(item_ids, dtype=np.int64), codes, "random")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread per test module (set before its module fixtures train anything): on a
    small shared CPU box, two threads contend and run ~10x slower."""
    with torch_threads(1):
        yield

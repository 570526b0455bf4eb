"""Slate building blocks shared by the baseline recommenders (numpy, vectorized over rows)."""

from __future__ import annotations

import numpy as np


def first_unique(candidates: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Per row, the column indices of the first `k` candidates that are `valid` (default:
    all) and do not repeat an earlier candidate of the row; -1 where a row runs short.

    Validity must be a property of the candidate's value within its row (every copy of an
    item valid or none), as "not in the history" is: a repeat is then invalid or a repeat.
    """
    n, m = candidates.shape
    bad = np.zeros((n, m), dtype=bool)
    order = np.argsort(candidates, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    repeat = ranked[:, 1:] == ranked[:, :-1]  # later copies (a stable sort keeps the first first)
    np.put_along_axis(bad, order[:, 1:], repeat, axis=1)
    if valid is not None:
        bad |= ~valid
    pick = np.argsort(bad, axis=1, kind="stable")[:, :k]
    short = np.take_along_axis(bad, pick, axis=1)
    return np.where(short, -1, pick)


def row_isin(values: np.ndarray, rows_of: np.ndarray, ignore: int) -> np.ndarray:
    """(n, m) bool: whether values[r, j] occurs in rows_of[r] (n, h), entries equal to
    `ignore` (padding) left out; one sort and one binary search for all rows, no n x m x h
    comparison. Ids must be non-negative and below 2**40, n below 2**23."""
    n, h = rows_of.shape
    shift = np.int64(1) << np.int64(40)
    row = np.arange(n, dtype=np.int64)[:, None]
    keys = np.sort((row * shift + rows_of)[rows_of != ignore])
    query = row * shift + values
    if not len(keys):
        return np.zeros(values.shape, dtype=bool)
    pos = np.searchsorted(keys, query.ravel()).clip(max=len(keys) - 1)
    return (keys[pos] == query.ravel()).reshape(values.shape) & (values >= 0)


def check_k(k: int, n_items: int, name: str) -> None:
    """Refuse a slate size outside 1 .. the catalog size, naming the recommender."""
    if not 1 <= k <= n_items:
        raise ValueError(f"{name}: slate size k={k} must be between 1 and the catalog size "
                         f"{n_items}")

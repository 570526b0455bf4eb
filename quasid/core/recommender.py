"""The interface every arm's stack serves, as the simulator and the offline evaluation see it.

A request is a user and the items they touched before it (oldest first). Histories travel
as one padded int64 matrix, so a whole batch of requests is one call:

    histories[r] = [-1, -1, ..., i_1, i_2, ..., i_t]   (left-padded with PAD, newest last)

`recommend` returns, per request, the `k` best item ids in slate order with their scores.
Implementations: the SID `Stack` (generative retrieval over SIDs + SID ranker), and the
popularity and random stacks the simulator is built and tested with.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

PAD = -1
"""Padding id in history matrices."""


@runtime_checkable
class Recommender(Protocol):
    """Anything that turns a batch of requests into slates."""

    name: str

    def recommend(
        self, histories: np.ndarray, k: int, users: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slates for a batch of requests.

        histories: (n, H) int64 item ids, left-padded with PAD, newest last.
        k: slate size.
        users: (n,) int64 user ids, for stacks that use them (None otherwise).
        Returns (items, scores): (n, k) int64 item ids in slate order (position 0 first)
        and (n, k) float32 scores; no item repeats within a slate.
        """
        ...

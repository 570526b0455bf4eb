"""The synthetic world's ground truth: the parameters the logs were drawn from.

Saved beside the data as `world.npz` so the simulator, the tokenizer metrics and the tests
all read the same truth. Ids are positions: user `u` is row `u` of the user arrays, item
`i` is row `i` of the item arrays.

The true model (all on the logit scale):
- preference  a(u, i) = <user_pref[u], item_taste[i]> + item_pop[i]
- price term  g(u, i) = -price_sensitivity[u] * log(price[i] / price_ref[i])
  (price_ref = the median price of the item's leaf category)
- logged choice among a slate: softmax over (a + g) / temperature + log position_bias[k]
- for the simulator: p(click | shown at k) = position_bias[k] * sigmoid(a + click_bias);
  p(order | click) = sigmoid(order_bias + order_slope * a + g);
  p(cancel | order) = cancel_rate; quantity = 1 + Poisson(quantity_extra).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from quasid.core.io import write_npz_atomic

DAY_SECONDS = 86_400


@dataclass(frozen=True)
class World:
    """True parameters of a synthetic world (arrays indexed by user or item id)."""

    user_pref: np.ndarray  # (n_users, taste_dim) float32
    price_sensitivity: np.ndarray  # (n_users,) float32
    activity: np.ndarray  # (n_users,) float32, expected interactions over the log window
    item_taste: np.ndarray  # (n_items, taste_dim) float32
    item_pop: np.ndarray  # (n_items,) float32, log-popularity
    item_leaf: np.ndarray  # (n_items,) int32, leaf category index
    price: np.ndarray  # (n_items,) float64
    price_ref: np.ndarray  # (n_items,) float64, leaf median price
    is_new: np.ndarray  # (n_items,) bool, arrived after the cutoff
    dup_group: np.ndarray  # (n_items,) int32, near-duplicate group id or -1
    lookalike_pairs: np.ndarray  # (n_pairs, 2) int64, harmful look-alike item pairs
    position_bias: np.ndarray  # (max_positions,) float32, examination probability by position
    temperature: float
    click_bias: float
    order_bias: float
    order_slope: float
    cancel_rate: float
    quantity_extra: float
    cutoff_ts: int
    end_ts: int
    seed: int

    @property
    def n_users(self) -> int:
        """Number of users."""
        return int(self.user_pref.shape[0])

    @property
    def n_items(self) -> int:
        """Number of items."""
        return int(self.item_taste.shape[0])

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True preference logit a(u, i) for aligned arrays of user and item ids (any shape)."""
        pref = np.einsum("...d,...d->...", self.user_pref[users], self.item_taste[items])
        return pref + self.item_pop[items]

    def price_utility(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True price term g(u, i) = -sensitivity[u] * log(price[i] / leaf median)."""
        rel = np.log(self.price[items] / self.price_ref[items])
        return -self.price_sensitivity[users] * rel

    def benign_pairs(self) -> np.ndarray:
        """All unordered item pairs (i < j) inside one near-duplicate group, shape (n, 2)."""
        ids = np.flatnonzero(self.dup_group >= 0)
        groups = self.dup_group[ids]
        order = np.argsort(groups, kind="stable")
        ids, groups = ids[order], groups[order]
        # groups are small: pair each member with the member k places after it in its group
        pairs = []
        max_size = int(np.bincount(groups).max()) if len(groups) else 0
        for k in range(1, max_size):
            same = groups[:-k] == groups[k:]
            pairs.append(np.stack([ids[:-k][same], ids[k:][same]], axis=1))
        if not pairs:
            return np.zeros((0, 2), dtype=np.int64)
        out = np.concatenate(pairs).astype(np.int64)
        return np.sort(out, axis=1)

    def save(self, path: str | Path) -> None:
        """Write to an `.npz` file (scalars stored as 0-d arrays)."""
        write_npz_atomic({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read a world written by `save`."""
        with np.load(path) as data:
            kwargs = {}
            for f in fields(cls):
                value = data[f.name]
                kwargs[f.name] = value.item() if value.ndim == 0 else value
        return cls(**kwargs)

    def summary(self) -> dict:
        """Counts worth putting in a data card."""
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_new_items": int(self.is_new.sum()),
            "n_duplicate_groups": int(len(np.unique(self.dup_group[self.dup_group >= 0]))),
            "n_items_in_duplicate_groups": int((self.dup_group >= 0).sum()),
            "n_lookalike_pairs": int(len(self.lookalike_pairs)),
            "cutoff_ts": int(self.cutoff_ts),
            "end_ts": int(self.end_ts),
        }

"""Cohorts: cold-start items, cold-start users and user-defined cohorts, as flags.

- cold-start items: `items.is_cold` (no interactions in the training logs);
- cold-start users: at most `COLD_USER_MAX_HISTORY` interactions before the experiment
  window (`quasid.data.splits.cold_users`);
- user-defined cohorts: SQL boolean expressions (`polars.sql_expr`) over the users table
  (`user_id`, `n_history`, `is_cold_user`) or the items table (`item_id`, `price`,
  `category`, `is_cold`). A null result counts as False.
User-level flags go into the assignment table and every event; item-level flags on events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from quasid.data.splits import cold_users
from simulator.config import CohortSpec
from simulator.lookup import IdIndex


class CohortError(ValueError):
    """A cohort expression that does not evaluate to a boolean on its table."""


def _evaluate(frame: pl.DataFrame, spec: CohortSpec, table: str) -> np.ndarray:
    try:
        result = frame.select(pl.sql_expr(spec.expr).alias(spec.column))[spec.column]
    except Exception as exc:  # polars raises several error types for unknown columns etc.
        raise CohortError(f"cohort '{spec.name}': expression {spec.expr!r} fails on the "
                          f"{table} table (columns {frame.columns}): {exc}") from None
    if result.dtype != pl.Boolean:
        raise CohortError(f"cohort '{spec.name}': expression {spec.expr!r} gives {result.dtype} "
                          f"on the {table} table, expected a boolean")
    return result.fill_null(False).to_numpy()


def user_table(train_users: np.ndarray, users: np.ndarray, cohorts: Sequence[CohortSpec]
               ) -> pl.DataFrame:
    """Users (sorted ids) with `n_history`, `is_cold_user` and their user-level cohort flags."""
    train = pl.DataFrame({"user_id": train_users.astype(np.int64)})
    frame = (pl.DataFrame({"user_id": np.unique(users).astype(np.int64)})
             .join(train.group_by("user_id").len("n_history"), on="user_id", how="left")
             .with_columns(pl.col("n_history").fill_null(0).cast(pl.Int64)))
    cold = cold_users(train, frame["user_id"])
    frame = frame.with_columns(is_cold_user=pl.col("user_id").is_in(cold.implode()))
    flags = {c.column: _evaluate(frame, c, "users") for c in cohorts if c.level == "user"}
    return frame.with_columns(*[pl.Series(k, v) for k, v in flags.items()])


@dataclass
class Catalog:
    """Item lookups by id (sorted ids, `IdIndex`): price, cold flag, item-level cohorts."""

    item_ids: np.ndarray
    price: np.ndarray
    is_cold: np.ndarray
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_items(cls, items: pl.DataFrame, cohorts: Sequence[CohortSpec]) -> Catalog:
        """Build from the items table, evaluating the item-level cohorts."""
        items = items.sort("item_id")
        flags = {c.column: _evaluate(items, c, "items") for c in cohorts if c.level == "item"}
        return cls(items["item_id"].to_numpy(), items["price"].to_numpy(),
                   items["is_cold"].to_numpy(), flags)

    def __post_init__(self) -> None:
        self._index = IdIndex(self.item_ids)

    def rows(self, items: np.ndarray, source: str = "stack") -> np.ndarray:
        """Row of each item id; an unknown id is an error naming `source`."""
        pos = self._index.positions(items)
        bad = pos < 0
        if bad.any():
            raise ValueError(f"{source}: returned item ids not in the catalog: "
                             f"{np.unique(np.asarray(items)[bad])[:5].tolist()}")
        return pos

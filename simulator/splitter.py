"""Traffic splitting: a salted hash of the unit id into 10,000 buckets, arms, layers, holdout.

- bucket(unit) = hash(salt, unit) mod 10,000. The salt names a *layer*: experiments that
  share a salt see the same buckets and must use disjoint bucket ranges (they are mutually
  exclusive); experiments with different salts hash independently (they are orthogonal:
  a user's arm in one says nothing about their arm in the other).
- arms: contiguous bucket ranges starting at `offset`, sized by allocation shares of the
  whole traffic (0.05 / 0.05 puts 5% of users in each arm and leaves 90% out of the
  experiment; 0.5 / 0.5 splits everyone). A share must be a whole number of buckets.
- holdout: a share of users, hashed with its own salt, kept out of every experiment.

The assignment table is a pure function of (salt, offset, allocations, holdout, units), so
it can be rebuilt from the salt alone (`assignment_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from quasid.core.hashing import hash_ids, string_key
from quasid.core.schemas import ASSIGNMENTS, validate

N_BUCKETS = 10_000
NOT_ASSIGNED = -1
HOLDOUT_SALT = "quasid-global-holdout"


def bucket_of(unit_ids: np.ndarray, salt: str) -> np.ndarray:
    """The bucket (0..9,999, int32) of each unit id under `salt`."""
    h = hash_ids(string_key(salt), np.asarray(unit_ids, dtype=np.int64))
    return (h % np.uint64(N_BUCKETS)).astype(np.int32)


def share_to_buckets(share: float, what: str) -> int:
    """A traffic share as a whole number of buckets; a clear error otherwise."""
    n = round(share * N_BUCKETS)
    if not 0 <= share <= 1 or abs(n - share * N_BUCKETS) > 1e-6:
        raise ValueError(f"{what}: share {share!r} must be in [0, 1] and a multiple of "
                         f"1/{N_BUCKETS} (a whole number of buckets)")
    return n


@dataclass(frozen=True)
class Allocation:
    """How one experiment splits traffic: arms with shares, its layer salt and offset, holdout."""

    arms: tuple[tuple[str, float], ...]
    salt: str
    offset: int = 0
    holdout: float = 0.0
    holdout_salt: str = HOLDOUT_SALT

    def __post_init__(self) -> None:
        names = [a for a, _ in self.arms]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"allocation: arm names must be non-empty and distinct, got {names}")
        if not self.salt:
            raise ValueError("allocation: the salt must be a non-empty string")
        sizes = [share_to_buckets(s, f"arm '{a}' allocation") for a, s in self.arms]
        if any(s == 0 for s in sizes):
            raise ValueError(f"allocation: every arm needs a share > 0, got {dict(self.arms)}")
        if not 0 <= self.offset or self.offset + sum(sizes) > N_BUCKETS:
            raise ValueError(f"allocation: buckets [{self.offset}, {self.offset + sum(sizes)}) "
                             f"do not fit in 0..{N_BUCKETS} (offset {self.offset}, arms "
                             f"{dict(self.arms)})")
        share_to_buckets(self.holdout, "holdout")
        if self.holdout >= 1:
            raise ValueError("allocation: a holdout of 1.0 leaves no traffic")

    @property
    def names(self) -> list[str]:
        """Arm names in allocation order."""
        return [a for a, _ in self.arms]

    @property
    def edges(self) -> np.ndarray:
        """Bucket boundaries: arm j holds buckets [edges[j], edges[j + 1])."""
        sizes = [share_to_buckets(s, a) for a, s in self.arms]
        return self.offset + np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def assign_arms(unit_ids: np.ndarray, allocation: Allocation) -> tuple[np.ndarray, np.ndarray]:
    """(arm index or NOT_ASSIGNED, bucket) per unit; held-out units are NOT_ASSIGNED."""
    unit_ids = np.asarray(unit_ids, dtype=np.int64)
    bucket = bucket_of(unit_ids, allocation.salt)
    edges = allocation.edges
    arm = np.searchsorted(edges, bucket, side="right") - 1
    arm = np.where((bucket >= edges[0]) & (bucket < edges[-1]), arm, NOT_ASSIGNED)
    if allocation.holdout > 0:
        held = bucket_of(unit_ids, allocation.holdout_salt) < share_to_buckets(
            allocation.holdout, "holdout")
        arm = np.where(held, NOT_ASSIGNED, arm)
    return arm.astype(np.int64), bucket


def held_out(unit_ids: np.ndarray, allocation: Allocation) -> np.ndarray:
    """Boolean mask of the units in the global holdout."""
    if allocation.holdout <= 0:
        return np.zeros(len(unit_ids), dtype=bool)
    n = share_to_buckets(allocation.holdout, "holdout")
    return bucket_of(np.asarray(unit_ids, dtype=np.int64), allocation.holdout_salt) < n


def assignment_table(experiment_id: str, units: pl.DataFrame, allocation: Allocation,
                     extra: Sequence[str] = ()) -> pl.DataFrame:
    """The assignments (ASSIGNMENTS schema) of `units` (`unit_id`, `assigned_at`, + `extra`).

    Units outside every arm (unallocated buckets, holdout) are left out. Rows are sorted by
    unit id, so the same inputs give the same bytes.
    """
    arm, bucket = assign_arms(units["unit_id"].to_numpy(), allocation)
    keep = arm >= 0
    table = units.select("unit_id", "assigned_at", *extra).filter(pl.Series(keep)).with_columns(
        pl.lit(experiment_id, dtype=pl.String).alias("experiment_id"),
        pl.Series("arm", np.asarray(allocation.names, dtype=object)[arm[keep]], dtype=pl.String),
        pl.Series("bucket", bucket[keep], dtype=pl.Int32),
    )
    table = table.select("experiment_id", "unit_id", "arm", "bucket", "assigned_at", *extra)
    return validate(table.sort("unit_id"), ASSIGNMENTS, source=f"assignments of {experiment_id}")

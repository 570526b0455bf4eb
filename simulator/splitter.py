"""Traffic splitting: a salted hash of the unit id into 10,000 buckets, arms, layers, holdout.

- bucket(unit) = hash(salt, unit) mod 10,000. The salt names a *layer*: experiments that
  share a salt see the same buckets and must use disjoint bucket ranges (they are mutually
  exclusive); experiments with different salts hash independently (they are orthogonal:
  a user's arm in one says nothing about their arm in the other).
- arms: contiguous bucket ranges starting at `offset`, sized by allocation shares of the
  whole traffic (0.05 / 0.05 puts 5% of users in each arm and leaves 90% out of the
  experiment; 0.5 / 0.5 splits everyone). A share must be a whole number of buckets.
- holdout: a share of users, hashed with its own salt, kept out of every experiment.
- replicates: an arm with R training replicates splits its bucket range into R cells,
  replicate = (bucket - the arm's first bucket) mod R: the cells differ by at most one
  bucket, and a user's cell is as stable as their arm.

The assignment table is a pure function of (salt, offset, allocations, holdout, units), so
it can be rebuilt from the salt alone (`assignment_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from quasid.core.hashing import hash_ids, string_key
from quasid.core.schemas import ASSIGNMENTS, REPLICATE_COLUMN, validate

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
    replicates: tuple[int, ...] = ()
    """Training replicates per arm, in arm order (empty: one each)."""

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
        if self.replicates and (len(self.replicates) != len(names)
                                or any(not 1 <= r <= s for r, s in zip(self.replicates, sizes))):
            raise ValueError(f"allocation: replicates {self.replicates} (expected one count "
                             f"per arm, each between 1 and the arm's buckets {sizes})")
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


def replicate_of(arm: np.ndarray, bucket: np.ndarray, allocation: Allocation) -> np.ndarray:
    """The training-replicate cell (0..R-1) of units in arm indices `arm` with `bucket`."""
    arm = np.asarray(arm, dtype=np.int64)
    if not allocation.replicates:
        return np.zeros(len(arm), dtype=np.int16)
    counts = np.asarray(allocation.replicates, dtype=np.int64)
    start = allocation.edges[:-1]
    safe = np.maximum(arm, 0)
    cell = (np.asarray(bucket, dtype=np.int64) - start[safe]) % counts[safe]
    return np.where(arm >= 0, cell, 0).astype(np.int16)


def held_out(unit_ids: np.ndarray, allocation: Allocation) -> np.ndarray:
    """Boolean mask of the units in the global holdout."""
    if allocation.holdout <= 0:
        return np.zeros(len(unit_ids), dtype=bool)
    n = share_to_buckets(allocation.holdout, "holdout")
    return bucket_of(np.asarray(unit_ids, dtype=np.int64), allocation.holdout_salt) < n


def assignment_table(experiment_id: str, units: pl.DataFrame, allocation: Allocation,
                     extra: Sequence[str] = ()) -> pl.DataFrame:
    """The assignments (ASSIGNMENTS schema) of `units` (`unit_id`, `assigned_at`, + `extra`),
    with each unit's training-replicate cell in an extra `replicate` column.

    Units outside every arm (unallocated buckets, holdout) are left out. Rows are sorted by
    unit id, so the same inputs give the same bytes.
    """
    arm, bucket = assign_arms(units["unit_id"].to_numpy(), allocation)
    keep = arm >= 0
    replicate = replicate_of(arm, bucket, allocation)
    table = units.select("unit_id", "assigned_at", *extra).filter(pl.Series(keep)).with_columns(
        pl.lit(experiment_id, dtype=pl.String).alias("experiment_id"),
        pl.Series("arm", np.asarray(allocation.names, dtype=object)[arm[keep]], dtype=pl.String),
        pl.Series("bucket", bucket[keep], dtype=pl.Int32),
        pl.Series(REPLICATE_COLUMN, replicate[keep], dtype=pl.Int16),
    )
    table = table.select("experiment_id", "unit_id", "arm", "bucket", "assigned_at",
                         REPLICATE_COLUMN, *extra)
    return validate(table.sort("unit_id"), ASSIGNMENTS, source=f"assignments of {experiment_id}")

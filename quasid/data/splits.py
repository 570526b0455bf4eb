"""Splits shared by every later step: leave-one-out per user and a time cutoff."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

COLD_USER_MAX_HISTORY = 3
"""A user with at most this many training interactions is a cold-start user."""


@dataclass(frozen=True)
class LeaveOneOut:
    """Per user, in time order: last interaction = test, second last = validation, rest = train."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame


def from_end(interactions: pl.DataFrame) -> pl.DataFrame:
    """Sort by (user, ts, item) and number each user's rows from the end (0 = last), in a
    column `_from_end`."""
    return interactions.sort(["user_id", "ts", "item_id"]).with_columns(
        (pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id") - 1)
        .cast(pl.Int64)
        .alias("_from_end")
    )


def leave_one_out(interactions: pl.DataFrame, cold_items: pl.Series | None = None) -> LeaveOneOut:
    """Leave-one-out split (the S3-Rec / TIGER protocol).

    `cold_items` (item ids): their interactions are removed from `train` only, so a cold
    item never has training signal but can still be a validation or test target.
    """
    ranked = from_end(interactions)
    train = ranked.filter(pl.col("_from_end") >= 2)
    if cold_items is not None:
        train = train.filter(~pl.col("item_id").is_in(cold_items.implode()))
    return LeaveOneOut(
        train=train.drop("_from_end"),
        valid=ranked.filter(pl.col("_from_end") == 1).drop("_from_end"),
        test=ranked.filter(pl.col("_from_end") == 0).drop("_from_end"),
    )


def time_split(interactions: pl.DataFrame, cutoff_ts: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, window): interactions strictly before `cutoff_ts`, and the rest."""
    before = pl.col("ts") < cutoff_ts
    return interactions.filter(before), interactions.filter(~before)


def cold_users(train: pl.DataFrame, users: pl.Series, max_history: int = COLD_USER_MAX_HISTORY
               ) -> pl.Series:
    """Users (from `users`) with at most `max_history` training interactions."""
    per_user = train.group_by("user_id").len()
    return (
        pl.DataFrame({"user_id": users.unique()})
        .join(per_user, on="user_id", how="left")
        .filter(pl.col("len").fill_null(0) <= max_history)["user_id"]
        .sort()
    )


def training_interactions(ds) -> pl.DataFrame:
    """What the tokenizers and the stacks learn from: the interactions before the dataset's
    cutoff when it has a clock, else the leave-one-out train part without cold items."""
    if ds.cutoff_ts is not None:
        return time_split(ds.interactions, ds.cutoff_ts)[0]
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    return leave_one_out(ds.interactions, cold_items=cold).train

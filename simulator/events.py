"""Events: building the rows of a batch of served slates, writing them, reading them back.

Rows per request (EVENTS schema): one `impression` per slate position; a `click` where
clicked; an `order` where a click converted; a `cancel` where the order was voided.
`quantity` is the order's quantity on order and cancel rows, 0 otherwise; `value` =
price x quantity on those rows, 0 otherwise. Event times: the request's ts, +10 s for a
click, +60 s for an order, +1 h for a cancel; `day` is the request's day (an event belongs
to the day of the request it answers). Rows are sorted by (request_id, position, stage).

Layout: `events/experiment_id=<id>/day=<d>/part-<shard>-of-<n>.parquet`, each file
written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.io import write_frame_atomic
from quasid.core.layout import EVENTS_DIR
from quasid.core.schemas import EVENT_TYPES, EVENTS, validate
from simulator.responses import Responses

STAGE_DELAY = np.array([0, 10, 60, 3_600], dtype=np.int64)  # impression, click, order, cancel
EVENT_NAMES = pl.Series(list(EVENT_TYPES), dtype=pl.String)  # stage code -> event_type
SORT_KEY = ["request_id", "position", "event_type"]


def partition_dir(out_dir: Path, experiment_id: str, day: int) -> Path:
    """The hive partition folder of one experiment day."""
    return Path(out_dir) / EVENTS_DIR / f"experiment_id={experiment_id}" / f"day={day}"


def part_name(shard: int, n_shards: int) -> str:
    """A shard's file name in each partition (the shard count is part of the name)."""
    return f"part-{shard:05d}-of-{n_shards:05d}.parquet"


def event_frame(
    experiment_id: str,
    arms: list[str],
    arm_index: np.ndarray,
    requests: dict[str, np.ndarray],
    items: np.ndarray,
    responses: Responses,
    price: np.ndarray,
    item_flags: dict[str, np.ndarray],
    user_flags: dict[str, np.ndarray],
) -> pl.DataFrame:
    """Event rows of one batch of served slates.

    arm_index, requests (request_id, user_id, ts, day) and user_flags: one value per
    request; items (n, k), price and item_flags (n, k): per slate position.
    """
    n, k = items.shape
    request_ids = np.asarray(requests["request_id"])
    # A (request, position, stage) cell holds an event when its stage happened; laid out
    # as (n, k, 4) in request-id order, the flat indices of the present cells are already
    # the rows sorted by (request_id, position, stage): no sort of the events is needed.
    present = np.stack([np.ones((n, k), dtype=bool), responses.click, responses.order,
                        responses.cancel], axis=-1)
    perm = None
    if n > 1 and not (request_ids[1:] > request_ids[:-1]).all():
        perm = np.argsort(request_ids, kind="stable")  # batches come sorted; others are too
        present = present[perm]
    flat = np.flatnonzero(present)
    stage = (flat & 3).astype(np.int8)
    cell = flat >> 2
    req, pos = np.divmod(cell, k)
    if perm is not None:
        req = perm[req]
    idx = req * k + pos
    quantity = np.where(stage >= 2, responses.quantity.ravel()[idx], 0).astype(np.int32)
    columns = {
        "experiment_id": pl.Series([experiment_id], dtype=pl.String).new_from_index(0, len(idx)),
        "arm": pl.Series(arms, dtype=pl.String).gather(_indices(arm_index[req])),
        "user_id": requests["user_id"][req],
        "request_id": request_ids[req],
        "ts": requests["ts"][req] + STAGE_DELAY[stage],
        "day": requests["day"][req].astype(np.int32),
        "item_id": items.ravel()[idx],
        "position": pos.astype(np.int16),
        "event_type": EVENT_NAMES.gather(_indices(stage)),
        "quantity": quantity,
        "value": np.round(price.ravel()[idx] * quantity, 2),
        "is_cold_item": item_flags["is_cold_item"].ravel()[idx],
        "is_cold_user": user_flags["is_cold_user"][req],
    }
    columns.update({name: flag.ravel()[idx] for name, flag in item_flags.items()
                    if name != "is_cold_item"})
    columns.update({name: flag[req] for name, flag in user_flags.items() if name != "is_cold_user"})
    return pl.DataFrame(columns)


def _indices(codes: np.ndarray) -> pl.Series:
    """Gather indices as a UInt32 Series: polars converts a numpy index array per call
    (~3x slower than the gather itself)."""
    return pl.Series(np.asarray(codes).astype(np.uint32, copy=False), dtype=pl.UInt32)


def batch_counts(arms: list[str], arm_index: np.ndarray, responses: Responses,
                 price: np.ndarray) -> dict[str, dict[str, int]]:
    """The shard record's counts of one batch (`simulator.rundir.COUNT_KEYS`, per arm with
    requests), from the arrays `event_frame` turns into rows: requests, one impression per
    slate position, clicks, orders, cancels, GMV in cents (orders' value minus cancels')."""
    k = responses.click.shape[1]
    arm_index = np.asarray(arm_index)
    rows, cols = np.nonzero(responses.order)
    # value = round(price x quantity, 2) as on the order and cancel rows, in whole cents
    cents = np.round(np.round(price[rows, cols] * responses.quantity[rows, cols], 2) * 100
                     ).astype(np.int64)
    kept = ~responses.cancel[rows, cols]  # a cancel row takes its order's value back
    per_request = {"clicks": np.count_nonzero(responses.click, axis=1),
                   "cancels": np.count_nonzero(responses.cancel, axis=1)}
    out = {}
    for a, arm in enumerate(arms):  # a few arms, each a vectorized sum
        sel = arm_index == a
        n = int(np.count_nonzero(sel))
        if n:
            on_arm = sel[rows]
            out[arm] = {"requests": n, "impressions": n * k,
                        **{key: int(v[sel].sum()) for key, v in per_request.items()},
                        "orders": int(np.count_nonzero(on_arm)),
                        "gmv_cents": int(cents[on_arm & kept].sum())}
    return out


def write_events(frame: pl.DataFrame, path: Path) -> Path:
    """Validate an events file (extra cohort columns kept) and write it atomically."""
    validate(frame, EVENTS, source=str(path))
    return write_frame_atomic(frame, path)


def read_events(out_dir: str | Path, experiment_id: str | None = None) -> pl.DataFrame:
    """All events of a run directory (optionally one experiment), sorted by the unique key."""
    root = Path(out_dir) / EVENTS_DIR
    if experiment_id is not None:
        root = root / f"experiment_id={experiment_id}"
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}: no event files")
    frame = pl.concat([pl.read_parquet(f, hive_partitioning=False) for f in files],
                      how="diagonal_relaxed")
    return frame.sort(["experiment_id", *SORT_KEY, "item_id"])


def events_digest(out_dir: str | Path, experiment_id: str | None = None) -> str:
    """sha256 of a run's events as content (sorted rows, all columns), independent of how
    they are split into files: 1 shard and 4 shards give the same digest."""
    frame = read_events(out_dir, experiment_id)
    frame = frame.select(sorted(frame.columns))
    h = hashlib.sha256(",".join(f"{c}:{t}" for c, t in frame.schema.items()).encode())
    for name in frame.columns:
        col = frame[name]
        if col.dtype == pl.String:
            h.update("\x00".join(col.to_list()).encode())
        else:
            h.update(col.to_numpy().tobytes())
    return h.hexdigest()

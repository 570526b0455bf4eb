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
    flat = [np.arange(n * k), np.flatnonzero(responses.click), np.flatnonzero(responses.order),
            np.flatnonzero(responses.cancel)]
    idx = np.concatenate(flat)
    stage = np.repeat(np.arange(4, dtype=np.int8), [len(f) for f in flat])
    req, pos = idx // k, idx % k
    order = np.lexsort((stage, pos, requests["request_id"][req]))
    idx, stage, req, pos = idx[order], stage[order], req[order], pos[order]
    quantity = np.where(stage >= 2, responses.quantity.ravel()[idx], 0).astype(np.int32)
    columns = {
        "experiment_id": pl.repeat(experiment_id, len(idx), dtype=pl.String, eager=True),
        "arm": pl.Series(arms, dtype=pl.String).gather(arm_index[req]),
        "user_id": requests["user_id"][req],
        "request_id": requests["request_id"][req],
        "ts": requests["ts"][req] + STAGE_DELAY[stage],
        "day": requests["day"][req].astype(np.int32),
        "item_id": items.ravel()[idx],
        "position": pos.astype(np.int16),
        "event_type": EVENT_NAMES.gather(stage),
        "quantity": quantity,
        "value": np.round(price.ravel()[idx] * quantity, 2),
        "is_cold_item": item_flags["is_cold_item"].ravel()[idx],
        "is_cold_user": user_flags["is_cold_user"][req],
    }
    columns.update({name: flag.ravel()[idx] for name, flag in item_flags.items()
                    if name != "is_cold_item"})
    columns.update({name: flag[req] for name, flag in user_flags.items() if name != "is_cold_user"})
    return pl.DataFrame(columns)


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

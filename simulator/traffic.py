"""Logged traffic as requests: which logged interactions are replayed, with what history.

Every logged interaction in the experiment window becomes one request: the user, the time,
and the items the user touched before it (`quasid.data.sequences.window_histories`, a gather
into one padded matrix per batch, so a request costs no Python and no list column). The request id is the interaction's row in
the logs sorted by (user_id, ts, item_id): stable, unique, and the same in every shard.

Windows:
- logs with a clock (the data card's `cutoff_ts`, e.g. the synthetic world): the experiment
  window is [start, start + days) with start = `window_start` or `cutoff_ts`, and the
  pre-period the `pre_days` before it; `ts` is the logged time;
- logs without one (Amazon: `ts` is the position in the user's sequence): the window holds
  each user's last `window_last` interactions, the pre-period the `pre_last` before them,
  and each request gets a virtual time drawn uniformly (a hash of the request) in its
  period and sorted within the user, so the user's order is kept.
Training logs (for the popularity stack and the cold-user cohort) = everything before the
window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from quasid.core.hashing import hash_ids, string_key, to_uniform
from quasid.data.sequences import user_starts, window_histories
from quasid.data.world import DAY_SECONDS


@dataclass
class Logs:
    """Logged interactions sorted by (user_id, ts, item_id); row r is request id r."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    start: np.ndarray  # first row of each row's user

    @classmethod
    def from_interactions(cls, interactions: pl.DataFrame) -> Logs:
        """Sort the interactions and index each user's block."""
        ordered = interactions.select("user_id", "item_id", "ts").sort(["user_id", "ts", "item_id"])
        user = ordered["user_id"].to_numpy()
        return cls(user, ordered["item_id"].to_numpy(), ordered["ts"].to_numpy(),
                   user_starts(user))

    def __len__(self) -> int:
        return len(self.user)

    def from_end(self) -> np.ndarray:
        """Per row, how many of the user's interactions come after it (0 = the last)."""
        end = np.empty(len(self.user), dtype=np.int64)
        boundaries = np.flatnonzero(np.r_[self.user[1:] != self.user[:-1], True])
        counts = np.diff(np.r_[-1, boundaries])
        end[:] = np.repeat(boundaries, counts)
        return end - np.arange(len(self.user))

    def histories(self, rows: np.ndarray, max_len: int) -> np.ndarray:
        """(len(rows), max_len) int64: each row's previous items, left-padded with PAD."""
        return window_histories(self.item, self.start, rows, max_len)


@dataclass(frozen=True)
class Traffic:
    """The requests of both periods and the training mask, for one dataset and window."""

    experiment: pl.DataFrame  # request_id, user_id, ts, day
    pre: pl.DataFrame
    train: np.ndarray  # bool per log row: before the experiment window
    clock: str  # "logged" or "virtual"
    window: tuple[int, int]  # [start, end) of the experiment window in event ts


def _frame(logs: Logs, rows: np.ndarray, ts: np.ndarray, start: int) -> pl.DataFrame:
    return pl.DataFrame({
        "request_id": rows.astype(np.int64),
        "user_id": logs.user[rows],
        "ts": ts.astype(np.int64),
        "day": ((ts - start) // DAY_SECONDS).astype(np.int32),
    })


def _virtual_ts(logs: Logs, rows: np.ndarray, start: int, days: int) -> np.ndarray:
    """Uniform times in [start, start + days) keyed on the request, sorted within each user."""
    u = to_uniform(hash_ids(string_key("virtual-clock"), rows))
    frame = pl.DataFrame({"user_id": logs.user[rows], "u": u})  # rows are sorted by user, ts
    u_sorted = frame.select(pl.col("u").sort().over("user_id"))["u"].to_numpy()
    return start + np.floor(u_sorted * days * DAY_SECONDS).astype(np.int64)


def build_traffic(logs: Logs, cutoff_ts: int | None, end_ts: int | None, days: int,
                  pre_days: int, window_start: int | None = None, window_last: int = 2,
                  pre_last: int = 2, source: str = "<data>") -> Traffic:
    """The experiment and pre-period requests (see the module docstring for the windows)."""
    start = window_start if window_start is not None else cutoff_ts
    if start is not None:
        end = start + days * DAY_SECONDS
        last = int(end_ts) if end_ts is not None else int(logs.ts.max()) + 1
        if end > last:
            raise ValueError(f"{source}: days={days} runs the window to ts {end}, past the end "
                             f"of the logs ({last}); at most {(last - start) // DAY_SECONDS} "
                             "days are available")
        in_main = (logs.ts >= start) & (logs.ts < end)
        pre_start = start - pre_days * DAY_SECONDS
        in_pre = (logs.ts >= pre_start) & (logs.ts < start)
        main_rows, pre_rows = np.flatnonzero(in_main), np.flatnonzero(in_pre)
        experiment = _frame(logs, main_rows, logs.ts[main_rows], start)
        pre = _frame(logs, pre_rows, logs.ts[pre_rows], pre_start)
        return Traffic(experiment, pre, logs.ts < start, "logged", (start, end))
    from_end = logs.from_end()
    main_rows = np.flatnonzero(from_end < window_last)
    pre_rows = np.flatnonzero((from_end >= window_last) & (from_end < window_last + pre_last))
    end = days * DAY_SECONDS
    pre_start = -pre_days * DAY_SECONDS
    experiment = _frame(logs, main_rows, _virtual_ts(logs, main_rows, 0, days), 0)
    pre = _frame(logs, pre_rows, _virtual_ts(logs, pre_rows, pre_start, max(pre_days, 1)),
                 pre_start)
    if pre_days == 0:
        pre = pre.clear()
    return Traffic(experiment, pre, from_end >= window_last, "virtual", (0, end))

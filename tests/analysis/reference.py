"""Reference computations for the analysis tests, written independently of the SQL:
per-user metric values from the raw event rows with polars, tests with scipy/numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats as sps

BASE = ("gmv", "completed", "cold_completed", "clicks", "impressions", "orders")
# metric -> (numerator, denominator or None, kind)
METRICS = {
    "gmv_per_user": ("gmv", None, "mean"),
    "completed_orders_per_user": ("completed", None, "mean"),
    "cold_item_completed_orders_per_user": ("cold_completed", None, "mean"),
    "buyer_rate": ("completed", None, "proportion"),
    "ctr": ("clicks", "impressions", "ratio"),
    "conversion": ("orders", "clicks", "ratio"),
    "aov": ("gmv", "completed", "ratio"),
}


def events(run_dir: Path, experiment_id: str) -> pl.DataFrame:
    """All event rows of one experiment (partition folder), with `day` from the path."""
    return pl.read_parquet(run_dir / "events" / f"experiment_id={experiment_id}",
                           hive_partitioning=True)


def per_user(run_dir: Path, experiment_id: str, where: pl.Expr | None = None) -> pl.DataFrame:
    """Per-user base sums over the (filtered) events, for every assigned user (0 if none)."""
    ev = events(run_dir, experiment_id)
    if where is not None:
        ev = ev.filter(where)
    t = pl.col("event_type")
    sign = pl.when(t == "order").then(1).when(t == "cancel").then(-1).otherwise(0)
    sums = ev.group_by("user_id").agg(
        (sign * pl.col("value")).sum().alias("gmv"),
        sign.sum().alias("completed"),
        (sign * pl.col("is_cold_item")).sum().alias("cold_completed"),
        (t == "click").sum().alias("clicks"),
        (t == "impression").sum().alias("impressions"),
        (t == "order").sum().alias("orders"),
    )
    units = pl.read_parquet(run_dir / "assignments.parquet").rename({"unit_id": "user_id"})
    out = units.join(sums, on="user_id", how="left").with_columns(
        [pl.col(c).fill_null(0).cast(pl.Float64) for c in BASE])
    return out.sort("user_id")


def values(frame: pl.DataFrame, metric: str, arm: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One arm's per-user values of a metric: y (and x for ratios)."""
    num, den, kind = METRICS[metric]
    f = frame.filter(pl.col("arm") == arm)
    y = f[num].to_numpy()
    if kind == "proportion":
        y = (y > 0).astype(np.float64)
    return y, (f[den].to_numpy() if den else None)


def welch(yc: np.ndarray, yt: np.ndarray) -> tuple[float, float]:
    """(difference of means, scipy's Welch p-value)."""
    return float(yt.mean() - yc.mean()), float(sps.ttest_ind(yt, yc, equal_var=False).pvalue)


def delta_ratio(yc, xc, yt, xt) -> tuple[float, float, float]:
    """(difference of ratios, its delta-method standard error, Welch-Satterthwaite df)
    from the per-unit linearization (y - r x) / mean(x)."""
    def arm(y, x):
        r = y.sum() / x.sum()
        lin = (y - r * x) / x.mean()
        return r, lin.var(ddof=1) / len(y)
    rc, vc = arm(yc, xc)
    rt, vt = arm(yt, xt)
    df = (vc + vt) ** 2 / (vc**2 / (len(yc) - 1) + vt**2 / (len(yt) - 1))
    return rt - rc, float(np.sqrt(vc + vt)), float(df)

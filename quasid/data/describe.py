"""Summaries of a dataset: counts, sparsity, prices, categories and cohort sizes."""

from __future__ import annotations

import numpy as np
import polars as pl

from quasid.data.dataset import Dataset
from quasid.data.splits import (
    COLD_USER_MAX_HISTORY,
    cold_users,
    leave_one_out,
    time_split,
)


def _quantiles(series: pl.Series, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict:
    return {f"p{int(q * 100)}": float(series.quantile(q, "nearest")) for q in qs}


def describe(ds: Dataset) -> dict:
    """Everything `quasid data describe` prints, as a JSON-ready dict."""
    items, inter = ds.items, ds.interactions
    n_users = int(inter["user_id"].n_unique())
    n_items = items.height
    per_user = inter.group_by("user_id").len()["len"]
    per_item = items.select("item_id").join(inter.group_by("item_id").len(), on="item_id",
                                            how="left")["len"].fill_null(0)
    prices = items["price"]
    cats = items["category"].fill_null("<null>").value_counts(sort=True)
    # the training portion: before the cutoff, or (no global time) the leave-one-out train part
    if ds.cutoff_ts is None:
        train = leave_one_out(inter, cold_items=items.filter("is_cold")["item_id"]).train
    else:
        train = time_split(inter, ds.cutoff_ts)[0]
    out = {
        "name": ds.name,
        "counts": {"users": n_users, "items": n_items, "interactions": inter.height},
        "sparsity": 1.0 - inter.select("user_id", "item_id").unique().height
        / max(1, n_users * n_items),
        "interactions_per_user": {"mean": float(per_user.mean()), **_quantiles(per_user)},
        "interactions_per_item": {"mean": float(per_item.mean()), **_quantiles(per_item)},
        "events": dict(inter["event"].value_counts(sort=True).iter_rows()),
        "price": {"min": float(prices.min()), "mean": float(prices.mean()),
                  "max": float(prices.max()), **_quantiles(prices)},
        "categories": {"distinct": int(items["category"].n_unique()),
                       "null": int(items["category"].null_count()),
                       "top": [(str(c), int(n)) for c, n in cats.head(5).iter_rows()]},
        "cohorts": {
            "cold_items": int(items["is_cold"].sum()),
            f"cold_users (<= {COLD_USER_MAX_HISTORY} training interactions)":
                int(cold_users(train, inter["user_id"]).len()),
        },
        "content_dim": int(items["content"].list.len()[0]) if n_items else 0,
    }
    if ds.cutoff_ts is not None:
        out["cutoff_ts"] = ds.cutoff_ts
    out["training_interactions"] = train.height
    if ds.world is not None:
        out["world"] = ds.world.summary()
        out["cohorts"]["new_items"] = int(np.sum(ds.world.is_new))
    return out

"""Is the validation/test gap in the data? Model-free baselines on both leave-one-out splits.

The offline tables score each user's last item (test) and select on the second-to-last
(validation); the same saved stacks score about a quarter higher on validation. This script
asks whether baselines that learn nothing show the same gap. For each split it builds a
training part (validation: every interaction but each user's last two; test: but the last
one, and again but the last two, as the models are trained) and scores, on every user with
a history:
- popularity: the 10 most frequent items of the training part, one list for all users;
- transition: the 10 items that most often follow the user's last history item in the
  training part, in that order (a first-order Markov chain; ties by item id; users whose
  last item never has a successor count as misses), HR@10 and NDCG@10;
plus the targets' training-part popularity (median count, share below 5 interactions) and
the share of targets already in the user's history. The cold items (`is_cold`) are dropped
from both training parts, as in the offline benchmark, so their targets are misses here.
All in polars, no per-user loops.

    python benchmarks/split_gap.py --data DIR [--data DIR2 ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from quasid.core.io import write_text_atomic
from quasid.data.dataset import load_dataset


def split(interactions: pl.DataFrame, drop: int, cold: pl.Series, fit_drop: int | None = None
          ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training part, requests) of the leave-one-out split that targets each user's
    `drop`-th interaction from the end (1: test, 2: validation). The training part holds
    everything before the last `fit_drop` (default `drop`) interactions, less the `cold`
    items' (as the offline benchmark's does); `fit_drop=2` with `drop=1` is the models'
    test protocol (trained on the validation's part, the validation item in the history).
    Requests: user_id, last (the last warm item before the target), target; users with none
    are left out."""
    ordered = interactions.sort(["user_id", "ts", "item_id"]).with_columns(
        back=pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id"))
    warm = ~pl.col("item_id").is_in(cold.implode())
    train = ordered.filter((pl.col("back") > (fit_drop or drop)) & warm)
    target = ordered.filter(pl.col("back") == drop).select("user_id", target="item_id")
    last = (ordered.filter((pl.col("back") > drop) & warm)
            .group_by("user_id").agg(last=pl.col("item_id").last()))  # in time order
    return train, last.join(target, on="user_id", how="inner")


def scores(train: pl.DataFrame, requests: pl.DataFrame, k: int = 10) -> dict[str, float]:
    """HR@k of the popularity and transition baselines, and the targets' statistics."""
    counts = train.group_by("item_id").len("count")
    top = counts.sort(["count", "item_id"], descending=[True, False]).head(k)["item_id"]
    successors = (
        train.sort(["user_id", "ts", "item_id"])
        .select(prev="item_id", nxt=pl.col("item_id").shift(-1).over("user_id"))
        .drop_nulls()
        .group_by("prev", "nxt").len("count")
        .sort(["prev", "count", "nxt"], descending=[False, True, False])
        .group_by("prev", maintain_order=True).head(k)
        .with_columns(rank=pl.int_range(pl.len()).over("prev"))  # 0 = the most frequent
    )
    found = requests.join(successors, left_on=["last", "target"], right_on=["prev", "nxt"],
                          how="inner")
    seen = requests.join(train.select("user_id", target="item_id").unique(),
                         on=["user_id", "target"], how="semi").height
    pop = requests.join(counts.rename({"item_id": "target"}), on="target", how="left") \
        .with_columns(pl.col("count").fill_null(0))
    n = requests.height
    return {
        "requests": n,
        "popularity_hr@10": float(requests["target"].is_in(top.implode()).mean()),
        "transition_hr@10": found.height / n,
        "transition_ndcg@10": float((1.0 / (found["rank"] + 2).log(2)).sum()) / n,
        "target_median_count": float(pop["count"].median()),
        "target_share_below_5": float((pop["count"] < 5).mean()),
        "target_in_history": seen / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, type=Path,
                        help="an imported dataset folder (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    result = {}
    for data in args.data:
        dataset = load_dataset(data)
        cold = dataset.items.filter(pl.col("is_cold"))["item_id"]
        row = {name: scores(*split(dataset.interactions, drop, cold, fit_drop))
               for name, drop, fit_drop in (("validation", 2, 2), ("test", 1, 1),
                                            ("test, fit as the models", 1, 2))}
        for key in ("popularity_hr@10", "transition_hr@10"):
            for test in ("test", "test, fit as the models"):
                row[f"{key} {test} / validation"] = row[test][key] / row["validation"][key]
        result[data.name] = row
        print(f"{data.name}: " + "; ".join(
            f"{split_name} " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items())
            for split_name, figures in row.items() if isinstance(figures, dict)), flush=True)
        for test in ("test", "test, fit as the models"):
            print(f"  {test} / validation: popularity "
                  f"{row[f'popularity_hr@10 {test} / validation']:.3f}, transition "
                  f"{row[f'transition_hr@10 {test} / validation']:.3f}", flush=True)
    if args.out:
        write_text_atomic(json.dumps(result, indent=2) + "\n", args.out)


if __name__ == "__main__":
    main()

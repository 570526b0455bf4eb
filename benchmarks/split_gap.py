"""Is the validation/test gap in the data? Model-free baselines on both leave-one-out splits.

The offline tables score each user's last item (test) and select on the second-to-last
(validation); the same saved stacks score about a quarter higher on validation. This script
asks whether baselines that learn nothing show the same gap. It fits the offline
benchmark's transition baseline (`quasid.stack.transitions`: the newest history items'
most frequent followers, then popularity) and a popularity ranking (the simulator's
`PopularityRecommender`) on a training part and scores them on every user's request
(`hit_ndcg`), under three protocols:
- validation: fit on all but each user's last two interactions, target the second-to-last;
- test, fit on all but the last: the validation interactions are training data;
- test, fit as the models: on all but the last two, the offline benchmark's protocol (the
  validation item is in the history, never a training target).
The cold items (`is_cold`) are dropped from every training part, as in the offline benchmark.
Also the targets' training-part popularity (median count, share below 5 interactions) and
the share of targets already in the user's history. Vectorized throughout (polars, numpy).

    python benchmarks/split_gap.py --data DIR [--data DIR2 ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.io import write_text_atomic
from quasid.core.recommender import PAD
from quasid.core.slates import row_isin
from quasid.data.dataset import load_dataset
from quasid.data.sequences import loo_requests
from quasid.data.splits import from_end
from quasid.evaluation.offline import TRANSITION_HISTORY
from quasid.stack.metrics import hit_ndcg
from quasid.stack.transitions import TransitionRecommender
from simulator.baselines import PopularityRecommender

PROTOCOLS = {  # name: (interactions dropped after the target, interactions the fit leaves out)
    "validation": (1, 2),
    "test, fit on all but the last": (0, 1),
    "test, fit as the models": (0, 2),
}


def protocol(interactions: pl.DataFrame, cold: pl.Series, after: int, fit_drop: int
             ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """(training part, histories, targets): each user's requests target the interaction
    `after` positions before their last (0: the last), with the items before it as the
    history; the training part is everything but each user's last `fit_drop` interactions,
    less the `cold` items'."""
    ranked = from_end(interactions)
    back = pl.col("_from_end")
    train = ranked.filter((back >= fit_drop)
                          & ~pl.col("item_id").is_in(cold.implode())).drop("_from_end")
    hist, targets = loo_requests(ranked.filter(back >= after).drop("_from_end"),
                                 TRANSITION_HISTORY)
    return train, hist, targets


def scores(train: pl.DataFrame, hist: np.ndarray, targets: np.ndarray, catalog: np.ndarray
           ) -> dict[str, float]:
    """HR@10 / NDCG@10 of the transition and popularity baselines fitted on `train`, and
    the targets' statistics."""
    transition = hit_ndcg(TransitionRecommender.fit(train).recommend(hist, 10)[0], targets)
    popular = PopularityRecommender.fit(catalog, train["item_id"].to_numpy())
    popularity = hit_ndcg(popular.recommend(hist, 10)[0], targets)
    ids, counts = np.unique(train["item_id"].to_numpy(), return_counts=True)
    pos = np.searchsorted(ids, targets).clip(max=len(ids) - 1)
    count = np.where(ids[pos] == targets, counts[pos], 0)
    return {
        "requests": int(len(targets)),
        "transition_hr@10": float(transition["hr@10"].mean()),
        "transition_ndcg@10": float(transition["ndcg@10"].mean()),
        "popularity_hr@10": float(popularity["hr@10"].mean()),
        "target_median_count": float(np.median(count)),
        "target_share_below_5": float((count < 5).mean()),
        "target_in_history": float(row_isin(targets[:, None], hist, PAD).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, type=Path,
                        help="an imported dataset folder (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    result = {}
    for data in args.data:
        ds = load_dataset(data)
        cold = ds.items.filter(pl.col("is_cold"))["item_id"]
        catalog = ds.items["item_id"].to_numpy()
        row = {name: scores(*protocol(ds.interactions, cold, after, fit_drop), catalog)
               for name, (after, fit_drop) in PROTOCOLS.items()}
        for name in list(PROTOCOLS)[1:]:
            for key in ("transition_hr@10", "popularity_hr@10"):
                row[f"{key} {name} / validation"] = row[name][key] / row["validation"][key]
        result[data.name] = row
        for name, figures in row.items():
            if isinstance(figures, dict):
                print(f"{data.name} {name}: " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in figures.items()), flush=True)
            else:
                print(f"{data.name} {name}: {figures:.3f}", flush=True)
    if args.out:
        write_text_atomic(json.dumps(result, indent=2) + "\n", args.out)


if __name__ == "__main__":
    main()

"""Summarize `tokenizer_quality.py --diagnose` output folders: harmful / benign collision rates
and what happened to the look-alike pairs during training, per tokenizer, mean ± sd over runs.

    python benchmarks/collision_evidence.py new=runs/new old=runs/old new+mining=runs/new_mine \
        --json benchmarks/results/collisions/summary.json --worlds W0 W1

Each NAME=DIR is one `tokenizer_quality.py --out DIR` folder (its run folders hold
metrics.json, tokenizer.json and, with --diagnose, history.json). Per tokenizer it prints:

- the final rates on all items (`*_collision_rate`: pairs with H <= 1, i.e. sharing >= 2 of 3
  codes; `*_full_collision_rate`: H = 0, the same SID);
- from the PairProbe records of the look-alike (harmful) pairs among the fit items, summed
  over all epochs: the share of their in-batch meetings each CVPM reason drops (or `valid`),
  the share the tokenizer's repulsion acted on, the share that are collaborative positives,
  meetings per pair per epoch; at the last epoch their Hamming histogram and mean latent
  distance over the distance of random pairs.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RATES = ("harmful_collision_rate", "harmful_full_collision_rate", "benign_collision_rate",
         "benign_full_collision_rate", "collision_rate")


def run_summary(run: Path) -> tuple[str, dict]:
    """(tokenizer label, figures) of one run folder."""
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "tokenizer.json").read_text())
    label = config["name"] + ("+mining" if config["train"].get("mine_conflicts") else "")
    out = {k: metrics[k] for k in RATES}
    history = run / "history.json"
    if history.exists():
        epochs = json.loads(history.read_text())["epochs"]
        probes = [e["probe"] for e in epochs if "probe" in e]
        if probes:
            reasons: dict[str, float] = defaultdict(float)
            occurrences = pushed = 0.0
            for p in probes:
                h = p["harmful"]
                occurrences += h["occurrences"]
                pushed += h["pushed_share"] * h["occurrences"]
                for k, v in h["reasons"].items():
                    reasons[k] += v
            last = probes[-1]["harmful"]
            hist = np.asarray(last["hamming_hist"], dtype=float)
            out.update({
                f"meetings_{k}": v / max(occurrences, 1) for k, v in reasons.items()})
            out.update({
                "meetings_pushed": pushed / max(occurrences, 1),
                "meetings_per_pair_epoch": float(np.mean([p["harmful"]["meetings_per_pair"]
                                                          for p in probes])),
                "collaborative_share": last["collaborative_share"],
                "fit_H0": hist[0] / hist.sum(), "fit_H1": hist[1] / hist.sum(),
                "fit_H2": hist[2] / hist.sum(), "fit_H3": hist[3] / hist.sum(),
                "distance_over_random": last["mean_distance"] / probes[-1]["reference_distance"],
                "benign_distance_over_random": probes[-1]["benign"]["mean_distance"]
                / probes[-1]["reference_distance"],
            })
            for frac in (0.1, 0.5, 1.0):
                e = probes[max(0, round(frac * len(probes)) - 1)]["harmful"]
                out[f"fit_rate_at_{int(frac * 100)}pct"] = e["rate_h_le_1"]
    return label, out


def summarize(folder: Path) -> dict:
    """{tokenizer: {figure: [mean, sd, n]}} over the runs of one folder."""
    per: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(folder.iterdir()):
        if (run / "metrics.json").exists():
            label, figures = run_summary(run)
            per[label].append(figures)
    out = {}
    for label, runs in per.items():
        keys = sorted(set().union(*runs))
        out[label] = {}
        for k in keys:
            v = np.asarray([r[k] for r in runs if k in r], dtype=float)
            out[label][k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                             len(v)]
    return out


def world_summary(folder: Path) -> dict:
    """How separable a world's look-alike pairs are from the logs: the correlation over users
    of the two items' true affinities (median over pairs), and the shares of pairs that are
    collaborative positives of the tokenizers' rule (window 2, >= 2 users) and that any user
    touched both of, in the training interactions."""
    import polars as pl

    from quasid.data.dataset import load_dataset
    from quasid.data.splits import training_interactions
    from quasid.tokenizer.pairs import collaborative_pairs

    ds = load_dataset(folder)
    world = ds.world
    pairs = world.lookalike_pairs
    taste = world.item_taste.astype(np.float64)
    a = world.user_pref.astype(np.float64) @ taste[pairs[:, 0]].T  # (users, pairs); the
    b = world.user_pref.astype(np.float64) @ taste[pairs[:, 1]].T  # popularity is constant
    a -= a.mean(0)
    b -= b.mean(0)
    corr = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    train = training_interactions(ds)
    positives = collaborative_pairs(train, window=2, min_count=2)
    keys = set(map(tuple, positives.select("item_a", "item_b").to_numpy().tolist()))
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    ui = train.select("user_id", "item_id").unique()
    frame = pl.DataFrame({"item_id": lo, "b": hi})
    both = ui.join(frame, on="item_id").join(ui.rename({"item_id": "b"}), on=["user_id", "b"])
    return {"pairs": len(pairs),
            "affinity_correlation_median": float(np.median(corr)),
            "positive_share": float(np.mean([(x, y) in keys for x, y in zip(lo, hi)])),
            "co_interacted_share": both.select("item_id", "b").unique().height / len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help="NAME=DIR (a tokenizer_quality.py --out folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--worlds", nargs="*", type=Path, default=[],
                        help="synthetic world folders: print how separable their look-alike "
                             "pairs are from the logs (world_summary)")
    args = parser.parse_args()
    summary = {}
    if args.worlds:
        summary["worlds"] = {}
        for folder in args.worlds:
            summary["worlds"][str(folder)] = row = world_summary(folder)
            print(folder, json.dumps({k: round(v, 4) for k, v in row.items()}))
    for item in args.groups:
        name, _, folder = item.partition("=")
        summary[name] = summarize(Path(folder))
    for name, tokenizers in summary.items():
        if name == "worlds":
            continue
        print(f"## {name}")
        keys = sorted(set().union(*(t.keys() for t in tokenizers.values())))
        print("| figure | " + " | ".join(tokenizers) + " |")
        print("|---" * (len(tokenizers) + 1) + "|")
        for k in keys:
            cells = [f"{t[k][0]:.3f} ± {t[k][1]:.3f}" if k in t else "-"
                     for t in tokenizers.values()]
            print(f"| {k} | " + " | ".join(cells) + " |")
        print()
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

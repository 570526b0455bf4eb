"""Offline quality of a `quasid run` folder's SID stacks on the synthetic world, and its MDEs.

The stacks train on the logged interactions before the world's cutoff (day 45); each user's
first logged interaction after the cutoff is the request's target, everything before it
(at most the stack's history length) the history: next-item HR@10 / NDCG@10 of the
stack's slates and of the retrieval stage's top list (the beam merged with cold items),
over all requests and over those whose target is a cold (new) item. Nothing here is seen
in training, and the test item of the simulator's replay is not involved: a time split of
the logs, not the leave-one-out protocol of `quasid eval` (whose test items a stack
trained on the cutoff's logs can have in its history).

    python benchmarks/main_job_quality.py runs/demo [--json out.json]

Also prints the minimum detectable effects of the primary metrics (`details.json`), and the
stack summaries' training times and epochs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from quasid.data.dataset import load_dataset
from quasid.data.sequences import sequence_windows
from quasid.stack.metrics import hit_ndcg
from quasid.stack.serving import Stack


def post_cutoff_requests(ds, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(histories, targets, target is cold): each user's first interaction at or after the
    cutoff, with the user's items before it."""
    if ds.cutoff_ts is None:
        raise ValueError("expected a dataset with a clock (the synthetic world)")
    ordered = ds.interactions.sort(["user_id", "ts", "item_id"])
    hist, items, users, _ = sequence_windows(ordered, max_len)
    after = ordered["ts"].to_numpy() >= ds.cutoff_ts
    first = after & np.r_[True, (users[1:] != users[:-1]) | ~after[:-1]]
    keep = first & (hist[:, -1] >= 0)
    cold_ids = ds.items.filter(pl.col("is_cold"))["item_id"].to_numpy()
    return hist[keep], items[keep], np.isin(items[keep], cold_ids)


def stack_quality(stack: Stack, hist: np.ndarray, targets: np.ndarray, cold: np.ndarray,
                  k: int = 10) -> dict:
    """{stage: {segment: {hr@k, ndcg@k}}} of the slates ("stack") and the beam ("retrieval")."""
    slate, _, beam = stack.slates(hist, k)
    out = {"n": {"all": int(len(targets)), "cold": int(cold.sum())}}
    for stage, ranked in (("stack", slate), ("retrieval", beam[:, :k])):
        per = hit_ndcg(ranked, targets, ks=(k,))
        out[stage] = {seg: {m: round(float(v[mask].mean()), 4) for m, v in per.items()}
                      for seg, mask in (("all", np.ones_like(cold)), ("cold", cold))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a `quasid run --out` folder")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    ds = load_dataset(args.run / "data")
    found: dict = {"stacks": {}, "mde": {}}
    for folder in sorted((args.run / "stacks").glob("*/seed*")):
        stack = Stack.load(folder)
        max_len = max(stack.cfg.retriever.max_history, stack.cfg.ranker.max_history)
        quality = stack_quality(stack, *post_cutoff_requests(ds, max_len))
        summary = json.loads((folder / "stack.json").read_text())
        quality["timings"] = summary["timings"]
        quality["retriever_epochs"] = summary["retriever_training"]["epochs_run"]
        name = str(folder.relative_to(args.run / "stacks"))
        found["stacks"][name] = quality
        print(name, json.dumps({k: quality[k] for k in ("stack", "retrieval", "n")}))
        print("   ", json.dumps({k: quality[k] for k in ("timings", "retriever_epochs")}))
    details = json.loads((args.run / "details.json").read_text())
    for row in details.get("power_analysis", []):
        found["mde"][row["metric"]] = {k: row.get(k) for k in ("mde_abs", "mde_rel", "units",
                                                                "power_at_target", "method")}
    print("mde", json.dumps(found["mde"]))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

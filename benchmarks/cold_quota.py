"""The stack's serving settings (first: its cold-start quota), measured on one trained stack
(inference only, CPU is enough).

Loads a saved stack (e.g. the Beauty rqvae seed-0 stack the offline benchmark exports),
then for each setting (`set_config` changes: `cold_candidates`, `cold_prefix`, `cold_slots`,
`candidates`, `transitions`' grid, ...): refits the retrieval and transition weights on
a sample of validation requests (each user's second-to-last item) and scores a sample of
test requests: overall, and every request whose target is a cold item (capped).

    python benchmarks/cold_quota.py --stack STACK.pt --data DIR --out cold_quota.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from quasid.data.dataset import load_dataset
from quasid.data.sequences import loo_requests, validation_requests
from quasid.stack.metrics import hit_ndcg
from quasid.stack.serving import Stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default='[{"cold_candidates": 0}]',
                        help="JSON list of StackConfig changes (set_config keyword arguments)")
    parser.add_argument("--requests", type=int, default=2000, help="random test requests")
    parser.add_argument("--cold-requests", type=int, default=600, help="cold-target test requests")
    parser.add_argument("--valid-requests", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    stack = Stack.load(args.stack)
    cold_ids = ds.items.filter(pl.col("is_cold"))["item_id"].to_numpy()
    hist, targets = loo_requests(ds.interactions, 20)
    v_hist, v_targets = validation_requests(ds.interactions, 20)
    rng = np.random.default_rng(0)
    sample = rng.permutation(len(targets))[: args.requests]
    cold = rng.permutation(np.flatnonzero(np.isin(targets, cold_ids)))[: args.cold_requests]
    valid = rng.permutation(len(v_targets))[: args.valid_requests]
    base = stack.cfg
    results = []
    for changes in json.loads(args.settings):
        start = time.perf_counter()
        stack.set_config(**{**base.model_dump(), **changes})
        fit = stack.fit_score_weights(v_hist[valid], v_targets[valid])
        row = {"settings": changes, "retrieval_weight": stack.cfg.retrieval_weight,
               "transition_weight": stack.cfg.transitions.weight,
               "weight_fit_ndcg@10": [{"retrieval_weight": w, "transition_weight": t, "ndcg@10": v}
                                      for (w, t), v in fit.items()]}
        for name, idx in (("all", sample), ("cold", cold)):
            slates = stack.recommend(hist[idx], 10)[0]
            m = hit_ndcg(slates, targets[idx])
            row[name] = {k: float(v.mean()) for k, v in m.items()}
            row[name]["requests"] = int(len(idx))
            row[name]["cold_items_per_slate"] = float(np.isin(slates, cold_ids).sum(1).mean())
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {"stack": args.stack, "data": args.data, "trained_retrieval_weight": base.retrieval_weight,
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Off-policy estimates (analysis/ope.py) validated on the synthetic world (issue 16.4).

Per seed: a synthetic world (`quasid.data.synthetic`), requests of random users, logged by
the simulator's uniformly random slate stack (`simulator.baselines.RandomRecommender`:
k distinct items uniformly at random, so P(item a at position k) = 1/n_items), their
responses drawn by the simulator's true response model (`simulator.responses.respond`).
Two target stacks: the simulator's popularity stack, and a personalized stack (top-k of the
world's true affinity plus Gumbel noise, a stand-in for a good trained stack). For each, the
truth is the target's expected CTR and order rate per impression on the same requests
(`TrueWorld.probabilities`), and its simulated online value is the same target served to the
same requests through `respond` with another seed. IPS, SNIPS, DR and replay are computed
from the random logs only; bias (mean of estimate − truth, also relative) and CI coverage
over the seeds are printed, and written as JSON with --out.

Usage: python benchmarks/ope_synthetic.py [--seeds 20] [--requests 60000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from analysis.ope import ESTIMATORS, Slots, estimate
from quasid.data.synthetic import WorldConfig, generate
from simulator.baselines import PopularityRecommender, RandomRecommender
from simulator.responses import TrueWorld, respond


def personalized(world, users: np.ndarray, k: int, seed: int, chunk: int = 5_000) -> np.ndarray:
    """Top-k of true affinity + Gumbel noise per request (a good, imperfect stack)."""
    rng = np.random.default_rng(seed + 99)
    items = np.arange(world.n_items)
    out = np.empty((len(users), k), dtype=np.int64)
    for s in range(0, len(users), chunk):
        u = users[s:s + chunk]
        a = world.affinity(u[:, None], items[None, :]) + rng.gumbel(size=(len(u), len(items)))
        top = np.argpartition(-a, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(a, top, axis=1), axis=1)
        out[s:s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def run_seed(seed: int, n_requests: int, n_items: int = 300, n_users: int = 3_000,
             k: int = 5, alpha: float = 0.05) -> dict:
    items, inter, world = generate(WorldConfig(n_items=n_items, n_users=n_users,
                                               content_dim=8, taste_dim=4, seed=seed))
    truth_world = TrueWorld(world)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_requests)
    requests = np.arange(n_requests, dtype=np.int64)
    logger = RandomRecommender(items["item_id"].to_numpy(), seed=seed)
    logged, _ = logger.recommend(requests[:, None], k, users)  # request id as the draw key
    resp = respond(truth_world, users, logged, requests, seed)
    targets = {
        "popularity": PopularityRecommender.fit(items["item_id"].to_numpy(),
                                                inter["item_id"].to_numpy()).recommend(
            np.full((n_requests, 1), -1, dtype=np.int64), k)[0],
        "personalized": personalized(world, users, k, seed),
    }
    out = {}
    for name, slate in targets.items():
        p = truth_world.probabilities(users, slate)
        truth = {"ctr": float(p.click.mean()), "order_rate": float((p.click * p.order).mean())}
        online = respond(truth_world, users, slate, requests, seed + 10_000)
        simulated = {"ctr": float(online.click.mean()), "order_rate": float(online.order.mean())}
        slots = Slots(np.repeat(requests, k), np.tile(np.arange(k), n_requests),
                      logged.ravel(), np.full(n_requests * k, 1.0 / n_items), slate.ravel(),
                      {"ctr": resp.click.ravel().astype(float),
                       "order_rate": resp.order.ravel().astype(float)})
        est = estimate(slots, alpha=alpha)
        out[name] = {"truth": truth, "simulated_online": simulated, "estimates": est["estimates"]}
    return out


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for target in runs[0]:
        for reward in ("ctr", "order_rate"):
            truth = np.array([r[target]["truth"][reward] for r in runs])
            online = np.array([r[target]["simulated_online"][reward] for r in runs])
            for est in ESTIMATORS:
                rows = [next((e for e in r[target]["estimates"][reward] if e["estimator"] == est),
                             None) for r in runs]
                if any(x is None for x in rows):
                    continue
                v = np.array([x["value"] for x in rows])
                lo = np.array([x["ci_low"] for x in rows])
                hi = np.array([x["ci_high"] for x in rows])
                se = np.array([x["se"] for x in rows])
                summary[f"{target}/{reward}/{est}"] = {
                    "truth_mean": float(truth.mean()),
                    "bias": float((v - truth).mean()),
                    "bias_se": float((v - truth).std(ddof=1) / np.sqrt(len(v))),
                    "rel_bias": float(((v - truth) / truth).mean()),
                    "rmse_rel": float(np.sqrt((((v - truth) / truth) ** 2).mean())),
                    "mean_se_rel": float((se / truth).mean()),
                    "coverage": float(((lo <= truth) & (truth <= hi)).mean()),
                    "coverage_online": float(((lo <= online) & (online <= hi)).mean()),
                    "seeds": len(v),
                }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=60_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = [run_seed(s, args.requests) for s in range(args.seeds)]
    summary = summarize(runs)
    print(f"{args.seeds} seeds x {args.requests} requests, 5 slots, 300 items, uniform random "
          f"logging; 95% CIs; {time.perf_counter() - t0:.0f} s")
    print(f"{'target/reward/estimator':40} {'truth':>9} {'rel.bias':>9} {'±se':>7} "
          f"{'rel.RMSE':>9} {'coverage':>9} {'cov.online':>10}")
    for key, s in summary.items():
        print(f"{key:40} {s['truth_mean']:9.5f} {100 * s['rel_bias']:+8.2f}% "
              f"{100 * s['bias_se'] / s['truth_mean']:6.2f}% {100 * s['rmse_rel']:8.2f}% "
              f"{s['coverage']:9.2f} {s['coverage_online']:10.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"settings": vars(args), "summary": summary}, fh, indent=2)


if __name__ == "__main__":
    main()

"""Tuning on the validation split (issue 15, items 3 and 5): SASRec or a SID tokenizer.

Each point is one `quasid.evaluation.offline.eval_run(split="valid")`: trained on the
leave-one-out training part, early-stopped (where the model does) on validation HR@10 and
scored on the validation requests (each user's second-to-last item) over the full item set.
Early stopping and the score use the same requests, as the offline benchmark's own fits
(ranker weight, cold bias) do: every point is equally optimistic, the ranking between them
is what counts. The best point (validation HR@10 of the stack, ties by NDCG@10) is written
as overrides for `benchmarks/offline_eval.py` / `quasid eval` (`--sasrec-overrides` for
SASRec, `--tokenizer-overrides` for a tokenizer).

Grids:
- SASRec (`--model sasrec`): `small` (the GPU search) = d_model {64, 128} x dropout {0.2, 0.5}
  x lr {1e-3, 3e-3}, 2 blocks, d_ff = 4 d_model, full-softmax loss, plus the paper's
  sampled-loss point (d_model 64, dropout 0.5, lr 1e-3, one negative); `tiny` = two CPU-sized
  points (full and sampled), to check the script end to end.
- A SID tokenizer (`--model quasid`, `rqvae`, `uniform`, ...): `random` = the defaults plus
  `--points - 1` points drawn (seeded by `--seed` and the model's name) from the model's
  search space (`SPACES`: RQ-VAE's beta, codebook size, learning rate and batch size under
  every gradient-trained tokenizer; HaMR's weight, margin and gamma, CVPM's near-duplicate
  threshold and co-interaction count, the contrastive weight and temperature for QuaSID; the
  repulsion's weight and margin for uniform; AdaSID's weight, margin and end ratio; batch
  composition, i.e. the content neighbours a partner is drawn from and conflict mining, for
  the tokenizers that repel collisions). `--space rqvae` searches QuaSID (or any tokenizer
  holding RQ-VAE's fields) at exactly the points RQ-VAE's search draws. Every
  model gets the same number of points, tokenizer epochs and stack settings, so the budgets
  are equal. `--tokenizer-epochs` and `--overrides` (stack) apply to every point; `--base`
  (JSON) is laid over every point of either kind, so the fields it names are held fixed.

    python benchmarks/tuning.py --model sasrec --data /path/beauty --out /tmp/tune/sasrec \
        --device cuda --jobs 9 --grid small
    python benchmarks/tuning.py --model quasid --data /path/beauty --out /tmp/tune/quasid \
        --device cuda --jobs 6 --grid random --points 6 --gpu-share 0.05 --deadline 515

`--deadline` stops the points still running after that many seconds (listed as failed; the
tables hold those that finished); `--gpu-share` caps each point's share of the GPU's memory
when other jobs share it (default 0.95 / jobs).

Writes OUT/tuning.json (every point: overrides, validation HR/NDCG@5/10 of the stack (the
model's top-10 for SASRec) and of the beam, cold HR@10, epochs run, best epoch, seconds; the
best point), OUT/tuning.md and OUT/best_overrides.json, and prints them. Finished points are
reused on a rerun with the same settings (their `metrics.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np

METRICS = ("hr@10", "ndcg@10", "hr@5", "ndcg@5")
SASREC = "sasrec"

# A dimension: ("log", lo, hi) log-uniform, ("lin", lo, hi) uniform, or a list to choose from.
_RQVAE = {"beta": ("lin", 0.1, 0.5), "codebook_size": [128, 256, 512],
          "train.lr": ("log", 1e-3, 4e-3), "train.batch_size": [512, 1024, 2048]}
_HAMR = {"hamr_weight": ("log", 5.0, 80.0), "hamr_margin": ("lin", 0.3, 1.0),
         "hamr_gamma": [0.5, 1.0, 2.0], "tau_dup": [0.95, 0.98, 0.99], "pair_min_count": [1, 2, 3]}
_ADASID = {"adasid_weight": ("log", 1.0, 20.0), "adasid_margin": ("lin", 0.5, 1.5),
           "rho_end": ("lin", 0.05, 0.3)}
# batch composition, for the tokenizers that repel collisions: how many content neighbours
# an anchor's partner is drawn from, and whether it is drawn among the live conflicts
_BATCH = {"train.neighbours": [4, 8, 16], "train.mine_conflicts": [False, True]}
SPACES = {
    "rqvae": _RQVAE,
    "rqkmeans": {"codebook_size": [128, 256, 512], "kmeans_iters": [10, 25, 50]},
    "quasid": _RQVAE | _HAMR | _BATCH | {"contrastive_weight": ("log", 0.05, 1.0),
                                         "tau": [0.05, 0.1, 0.2]},
    "uniform": _RQVAE | _BATCH | {"uniform_weight": ("log", 5.0, 80.0),
                                  "uniform_margin": ("lin", 0.6, 1.6)},
    "adasid": _RQVAE | _ADASID,
    "rqvae+hamr": _RQVAE | _HAMR | _BATCH,
    "adasid+hamr": _RQVAE | _ADASID | _HAMR | _BATCH,
}
"""Each SID tokenizer's search space (TokenizerConfig fields; "train.x" = TrainConfig's x)."""


def sasrec_grid(name: str) -> list[dict]:
    """SASRec's points (SasrecConfig overrides) of the named grid."""
    if name == "small":
        points = [{"d_model": d, "d_ff": 4 * d, "n_layers": 2, "dropout": p, "lr": lr,
                   "loss": "full"}
                  for d, p, lr in product((64, 128), (0.2, 0.5), (1e-3, 3e-3))]
        return points + [{"d_model": 64, "d_ff": 256, "n_layers": 2, "dropout": 0.5, "lr": 1e-3,
                          "loss": "sampled", "negatives": 1}]
    if name == "tiny":
        base = {"d_model": 16, "d_ff": 32, "n_heads": 1, "n_layers": 1, "max_history": 20,
                "batch_size": 256, "dropout": 0.2, "lr": 3e-3, "warmup": 10, "patience": 2}
        return [base | {"loss": "full"}, base | {"loss": "sampled", "negatives": 4}]
    raise SystemExit(f"--grid {name!r} for sasrec: expected 'small' or 'tiny'")


def random_points(model: str, n: int, seed: int, space: str | None = None) -> list[dict]:
    """The defaults ({}) and `n - 1` points drawn from `SPACES[space or model]`, as nested
    overrides.

    Seeded by (seed, the space's name): the same call gives the same points on any machine,
    and a model searched in another model's space (QuaSID in RQ-VAE's: `space="rqvae"`) gets
    exactly that model's points, a paired comparison at equal settings.
    """
    if model not in SPACES:
        raise SystemExit(f"--model {model!r}: expected {SASREC!r} or one of {sorted(SPACES)}")
    space = space or model
    if space not in SPACES or not set(SPACES[space]) <= set(SPACES[model]):
        raise SystemExit(f"--space {space!r}: expected a space whose fields {model} has, one of "
                         f"{sorted(k for k, v in SPACES.items() if set(v) <= set(SPACES[model]))}")
    if n < 1:
        raise SystemExit(f"--points {n}: expected at least 1 (the defaults)")
    rng = np.random.default_rng([seed, zlib.crc32(space.encode())])
    points = [{}]
    for _ in range(n - 1):
        point: dict = {}
        for key, dim in SPACES[space].items():
            if isinstance(dim, list):
                value = dim[int(rng.integers(len(dim)))]
            else:
                kind, lo, hi = dim
                u = float(rng.random())
                value = (lo * (hi / lo) ** u if kind == "log" else lo + (hi - lo) * u)
                value = float(f"{value:.3g}")  # readable points; 3 digits are plenty
            *parents, leaf = key.split(".")
            node = point
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        points.append(point)
    return points


def point_names(points: list[dict], model: str = SASREC) -> list[str]:
    """Folder names: for SASRec the settings the points differ in (e.g. d_model64-dropout0.2-
    lossfull-lr0.001), for a tokenizer p00 (the defaults), p01, ...; a point's full overrides
    are in its metrics.json and tuning.json."""
    if model != SASREC:
        return [f"p{i:02d}" for i in range(len(points))]
    keys = sorted({k for p in points for k in p})
    varying = [k for k in keys if len({json.dumps(p.get(k)) for p in points}) > 1] or keys[:1]
    names = ["-".join(f"{k}{p[k]}" for k in varying if k in p) for p in points]
    if len(set(names)) != len(names):
        raise SystemExit(f"grid: points repeat ({names})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SASREC,
                        help=f"{SASREC} or a SID tokenizer: {', '.join(SPACES)}")
    parser.add_argument("--data", required=True, help="dataset folder (leave-one-out)")
    parser.add_argument("--out", required=True, help="work and result folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="grid points at once (processes)")
    parser.add_argument("--grid", default=None,
                        help="sasrec: small (GPU, the default) or tiny (a CPU check); "
                             "a tokenizer: random")
    parser.add_argument("--points", type=int, default=8,
                        help="points of a tokenizer's random grid, the defaults included")
    parser.add_argument("--epochs", type=int, default=None,
                        help="SASRec: epoch ceiling of every point")
    parser.add_argument("--tokenizer-epochs", type=int, default=None,
                        help="a tokenizer: training epochs of every point")
    parser.add_argument("--overrides", default="",
                        help="a tokenizer: stack config overrides (JSON) of every point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-share", type=float, default=None,
                        help="each point's cap on the GPU's memory (default 0.95 / jobs; lower it "
                             "when other jobs share the GPU)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which unfinished points stop (listed as failed); the "
                             "tables then hold the points that finished")
    parser.add_argument("--space", default=None,
                        help="a tokenizer: draw from another tokenizer's space (its points "
                             "exactly), e.g. --model quasid --space rqvae; default: its own")
    parser.add_argument("--base", default="",
                        help="overrides (JSON) laid over every point, so their fields are held "
                             "fixed (SasrecConfig or TokenizerConfig fields)")
    args = parser.parse_args()
    started = time.perf_counter()
    base = json.loads(args.base) if args.base else {}
    if args.model == SASREC:
        args.grid = args.grid or "small"
        if args.epochs is not None:
            base["epochs"] = args.epochs
        points = [p | base for p in sasrec_grid(args.grid)]
        from quasid.stack.sasrec import sasrec_config as check
    else:
        args.grid = args.grid or "random"
        if args.grid != "random":
            raise SystemExit(f"--grid {args.grid!r} for {args.model}: expected 'random'")
        from quasid.core.config import nested_update
        from quasid.tokenizer.config import tokenizer_config

        points = [nested_update(p, base) for p in random_points(args.model, args.points,
                                                                  args.seed, args.space)]

        def check(p):
            return tokenizer_config(args.model, p)
    for p in points:
        check(p)  # a bad point fails here, naming the field, before any training
    out = Path(args.out)
    done, failed = run_points(args, points, out, started)
    results = summarize(args, points, done, failed, time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tuning.md").write_text(markdown(results))
    if results["best"] is not None:
        (out / "best_overrides.json").write_text(json.dumps(results["best"]["overrides"]) + "\n")
    print(markdown(results), flush=True)
    print("best overrides:", json.dumps(results["best"] and results["best"]["overrides"]),
          flush=True)


def run_points(args, points: list[dict], out: Path, started: float
               ) -> tuple[dict[str, dict], dict[str, str]]:
    """Every point's `eval_run` (split="valid"), `args.jobs` at once, those unfinished at
    `args.deadline` seconds after `started` stopped; (metrics by name, errors)."""
    from quasid.evaluation.offline import eval_run, run_parallel

    done, failed = {}, {}
    jobs = max(1, args.jobs)
    kwargs = dict(device=args.device, split="valid", save_stack=False,
                  threads=max(1, (os.cpu_count() or 1) // jobs))
    if args.model != SASREC:
        kwargs |= dict(tokenizer_epochs=args.tokenizer_epochs,
                       overrides=json.loads(args.overrides) if args.overrides else None)
    key = "sasrec_overrides" if args.model == SASREC else "tokenizer_overrides"
    calls = {name: (args.data, args.model, args.seed, out / "runs" / name, kwargs | {key: p})
             for name, p in zip(point_names(points, args.model), points)}

    def collect(name, result) -> None:
        try:
            done[name] = result()
            print(f"{name}: {_brief(done[name])}", flush=True)
        except Exception as exc:  # one failed point must not sink the grid
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED {failed[name]}", flush=True)

    if jobs == 1 and not args.deadline:
        for name, (*call, kw) in calls.items():
            collect(name, partial(eval_run, *call, **kw))
        return done, failed
    stopped = run_parallel(eval_run, {n: (tuple(call), kw) for n, (*call, kw) in calls.items()},
                           jobs, args.device, args.deadline, collect, started, args.gpu_share)
    for name in stopped:
        failed[name] = f"stopped at the {args.deadline:.0f} s deadline"
        print(f"{name}: {failed[name]}", flush=True)
    return done, failed


def _training(run: dict) -> dict:
    """The early-stopped model's record: SASRec's own, a SID stack's retriever."""
    summary = run["summary"]
    return summary["training"] if "training" in summary else summary["retriever_training"]


def _brief(run: dict) -> str:
    m, t = run["stack"]["all"], _training(run)
    return (f"valid hr@10 {m['hr@10']:.4f} ndcg@10 {m['ndcg@10']:.4f} "
            f"(epochs {t['epochs_run']}, best {t['best_epoch']}, {run['timings']['total_s']}s)")


def summarize(args, points: list[dict], done: dict, failed: dict, seconds: float) -> dict:
    """The tuning record: every point's validation figures and the best point."""
    rows = []
    for name, p in zip(point_names(points, args.model), points):
        run = done.get(name)
        if run is None:
            continue
        t = _training(run)
        rows.append({"name": name, "overrides": p,
                     **{m: run["stack"]["all"][m] for m in METRICS},
                     **{f"beam_{m}": run["retrieval"]["all"][m] for m in METRICS},
                     "cold_hr@10": run["stack"]["cold"]["hr@10"],
                     "cold_slot_share": run.get("cold_slot_share", float("nan")),
                     "epochs_run": t["epochs_run"], "best_epoch": t["best_epoch"],
                     "seconds": run["timings"]["total_s"], "requests": run["n"]["all"]})
    best = max(rows, key=lambda r: (r["hr@10"], r["ndcg@10"]), default=None)
    return {"model": args.model, "data": str(args.data), "device": args.device,
            "grid": args.grid, "space": getattr(args, "space", None) or args.model,
            "seed": args.seed, "split": "valid",
            "selected_by": "validation hr@10, then ndcg@10", "points": rows, "best": best,
            "failed": failed, "total_s": round(seconds, 1)}


def markdown(results: dict) -> str:
    """tuning.md: one row per point, the best one marked; a tokenizer's points spelled out."""
    model = results.get("model", SASREC)
    head = ("| point | " + " | ".join(f"valid {m}" for m in METRICS)
            + " | beam hr@10 | cold hr@10 | cold slots | epochs (best) | s |")
    lines = [f"# {'SASRec' if model == SASREC else model} tuning on the validation split: "
             f"{results['data']}", "",
             f"grid `{results['grid']}`, seed {results['seed']}, device {results['device']}, "
             f"selected by {results['selected_by']}", "", head,
             "|" + " --- |" * (len(METRICS) + 6)]
    best = results["best"] and results["best"]["name"]
    for r in results["points"]:
        mark = " **best**" if r["name"] == best else ""
        lines.append(f"| {r['name']}{mark} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                     + f" | {r['beam_hr@10']:.4f} | {r['cold_hr@10']:.4f}"
                     f" | {r['cold_slot_share']:.4f} | {r['epochs_run']} ({r['best_epoch']}) "
                     f"| {r['seconds']} |")
    if model != SASREC:
        lines += ["", "Points (tokenizer overrides; p00 = the defaults):", ""]
        lines += [f"- {r['name']}: `{json.dumps(r['overrides'])}`" for r in results["points"]]
    if results["failed"]:
        lines += ["", "Failed points:"] + [f"- {k}: {v}" for k, v in results["failed"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

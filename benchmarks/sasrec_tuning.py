"""SASRec tuned on the validation split (issue 15, item 3): a small grid, never the test items.

Each grid point is one `quasid.evaluation.offline.eval_run(tokenizer="sasrec",
split="valid")`: trained on the leave-one-out training part, early-stopped on validation
HR@10 and scored on the validation requests (each user's second-to-last item) over the full
item set. Early stopping and the score use the same requests, as the offline benchmark's
own tuning does: every point is equally optimistic, the ranking between them is what counts.
The best point (validation HR@10, ties by NDCG@10) is written as overrides for
`benchmarks/offline_eval.py --sasrec-overrides` / `quasid eval --sasrec-overrides`.

Grids: `small` (the GPU search) = d_model {64, 128} x dropout {0.2, 0.5} x lr {1e-3, 3e-3},
2 blocks, d_ff = 4 d_model, full-softmax loss, plus the paper's sampled-loss point (d_model
64, dropout 0.5, lr 1e-3, one negative); `tiny` = two CPU-sized points (full and sampled),
to check the script end to end.

    python benchmarks/sasrec_tuning.py --data /path/beauty --out /tmp/sasrec_tune \
        --device cuda --jobs 9 --grid small

Writes OUT/tuning.json (every point: overrides, validation HR/NDCG@5/10, cold HR@10, the
share of top-10 slots cold items take, epochs run, best epoch, seconds; the best point),
OUT/tuning.md and OUT/best_overrides.json, and prints them.
Finished points are reused on a rerun with the same settings (their `metrics.json`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import product
from pathlib import Path

METRICS = ("hr@10", "ndcg@10", "hr@5", "ndcg@5")


def grid(name: str) -> list[dict]:
    """The grid points (SasrecConfig overrides) of the named grid."""
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
    raise SystemExit(f"--grid {name!r}: expected 'small' or 'tiny'")


def point_names(points: list[dict]) -> list[str]:
    """Folder names that spell the settings the points differ in, e.g. d_model64-dropout0.2-
    lossfull-lr0.001 (a point's full overrides are in its metrics.json and tuning.json)."""
    keys = sorted({k for p in points for k in p})
    varying = [k for k in keys if len({json.dumps(p.get(k)) for p in points}) > 1] or keys[:1]
    names = ["-".join(f"{k}{p[k]}" for k in varying if k in p) for p in points]
    if len(set(names)) != len(names):
        raise SystemExit(f"grid: points repeat ({names})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder (leave-one-out)")
    parser.add_argument("--out", required=True, help="work and result folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="grid points at once (processes)")
    parser.add_argument("--grid", default="small", help="small (GPU) or tiny (a CPU check)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch ceiling of every point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="",
                        help="SasrecConfig overrides (JSON) under every point")
    args = parser.parse_args()
    started = time.perf_counter()
    base = json.loads(args.base) if args.base else {}
    if args.epochs is not None:
        base["epochs"] = args.epochs
    points = [base | p for p in grid(args.grid)]
    from quasid.stack.sasrec import sasrec_config

    for p in points:
        sasrec_config(p)  # a bad point fails here, naming the field, before any training
    out = Path(args.out)
    done, failed = run_points(args, points, out)
    results = summarize(args, points, done, failed, time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tuning.md").write_text(markdown(results))
    if results["best"] is not None:
        (out / "best_overrides.json").write_text(json.dumps(results["best"]["overrides"]) + "\n")
    print(markdown(results), flush=True)
    print("best overrides:", json.dumps(results["best"] and results["best"]["overrides"]),
          flush=True)


def run_points(args, points: list[dict], out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Every point's `eval_run` (split="valid"), `args.jobs` at once; (metrics by name, errors)."""
    from quasid.evaluation.offline import eval_run

    done, failed = {}, {}
    jobs = max(1, args.jobs)
    kwargs = dict(device=args.device, split="valid", save_stack=False,
                  threads=max(1, (os.cpu_count() or 1) // jobs))
    calls = {name: (args.data, "sasrec", args.seed, out / "runs" / name,
                    kwargs | {"sasrec_overrides": p})
             for name, p in zip(point_names(points), points)}
    if jobs == 1:
        for name, (*call, kw) in calls.items():
            try:
                done[name] = eval_run(*call, **kw)
                print(f"{name}: {_brief(done[name])}", flush=True)
            except Exception as exc:  # one failed point must not sink the grid
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"{name}: FAILED {failed[name]}", flush=True)
        return done, failed
    # each process gets its share of the GPU memory, as benchmarks/offline_eval.py does
    share = 0.95 / jobs if args.device.startswith("cuda") else None
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_limit_gpu,
                             initargs=(share,)) as pool:
        futures = {pool.submit(eval_run, *call, **kw): name for name, (*call, kw) in calls.items()}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                done[name] = fut.result()
                print(f"{name}: {_brief(done[name])}", flush=True)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"{name}: FAILED {failed[name]}", flush=True)
    return done, failed


def _limit_gpu(share: float | None) -> None:
    """Pool initializer: cap this process's CUDA allocator at `share` of the device memory."""
    if share is not None:
        import torch

        torch.cuda.set_per_process_memory_fraction(share)


def _brief(run: dict) -> str:
    m, t = run["stack"]["all"], run["summary"]["training"]
    return (f"valid hr@10 {m['hr@10']:.4f} ndcg@10 {m['ndcg@10']:.4f} "
            f"(epochs {t['epochs_run']}, best {t['best_epoch']}, {run['timings']['total_s']}s)")


def summarize(args, points: list[dict], done: dict, failed: dict, seconds: float) -> dict:
    """The tuning record: every point's validation figures and the best point."""
    rows = []
    for name, p in zip(point_names(points), points):
        run = done.get(name)
        if run is None:
            continue
        t = run["summary"]["training"]
        rows.append({"name": name, "overrides": p,
                     **{m: run["stack"]["all"][m] for m in METRICS},
                     "cold_hr@10": run["stack"]["cold"]["hr@10"],
                     "cold_slot_share": run.get("cold_slot_share", float("nan")),
                     "epochs_run": t["epochs_run"], "best_epoch": t["best_epoch"],
                     "seconds": run["timings"]["total_s"], "requests": run["n"]["all"]})
    best = max(rows, key=lambda r: (r["hr@10"], r["ndcg@10"]), default=None)
    return {"data": str(args.data), "device": args.device, "grid": args.grid, "seed": args.seed,
            "split": "valid", "selected_by": "validation hr@10, then ndcg@10",
            "points": rows, "best": best, "failed": failed, "total_s": round(seconds, 1)}


def markdown(results: dict) -> str:
    """tuning.md: one row per point, the best one marked."""
    head = ("| point | " + " | ".join(f"valid {m}" for m in METRICS)
            + " | cold hr@10 | cold slots | epochs (best) | s |")
    lines = [f"# SASRec tuning on the validation split: {results['data']}", "",
             f"grid `{results['grid']}`, seed {results['seed']}, device {results['device']}, "
             f"selected by {results['selected_by']}", "", head, "|" + " --- |" * (len(METRICS) + 5)]
    best = results["best"] and results["best"]["name"]
    for r in results["points"]:
        mark = " **best**" if r["name"] == best else ""
        lines.append(f"| {r['name']}{mark} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                     + f" | {r['cold_hr@10']:.4f} | {r['cold_slot_share']:.4f}"
                     f" | {r['epochs_run']} ({r['best_epoch']}) "
                     f"| {r['seconds']} |")
    if results["failed"]:
        lines += ["", "Failed points:"] + [f"- {k}: {v}" for k, v in results["failed"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

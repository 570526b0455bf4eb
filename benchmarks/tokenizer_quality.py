"""SID quality of each tokenizer on one or more datasets, over seeds: the issue-4 targets, measured.

Runs `quasid.tokenizer.train.train_tokenizer` for every (dataset, tokenizer, seed) and prints
one row per tokenizer with the mean ± standard deviation over runs of collision rate, SID
entropy, and, on the synthetic world, the harmful / benign collision rates (also split into
look-alike pairs whose two items are fit items and pairs with a cold member); writes every
run's metrics.

    python benchmarks/tokenizer_quality.py --data DIR --out runs/tq --device cuda --seeds 0 1 2
    python benchmarks/tokenizer_quality.py --data DIR --out runs/tq --set hamr_weight=5 \
        --tokenizers quasid

Several synthetic worlds with `--paired` train seed k on the k-th world (world and training
noise together); `--diagnose` records what happens to the look-alike and near-duplicate
pairs during training (`quasid.tokenizer.diagnostics.PairProbe`, in each run's history.json)
and `--plot PNG` draws it per tokenizer, averaged over runs:

    python benchmarks/tokenizer_quality.py --data w0 w1 w2 --seeds 0 1 2 --paired \
        --tokenizers quasid uniform rqvae rqvae+hamr --diagnose --out runs/coll \
        --plot benchmarks/results/collisions_diagnostics.png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from quasid.core.schemas import SID_TABLE, read_parquet
from quasid.data.dataset import load_dataset
from quasid.tokenizer.diagnostics import PROBE_REASONS
from quasid.tokenizer.train import train_tokenizer

TOKENIZERS = ("rqkmeans", "rqvae", "quasid", "uniform", "adasid", "rqvae+hamr", "adasid+hamr")
KEYS = ("collision_rate", "sid_entropy", "harmful_collision_rate", "benign_collision_rate",
        "harmful_warm_rate", "harmful_cold_rate", "codebook_utilization", "train_seconds")


def parse_sets(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON when they parse (numbers, lists, booleans)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def warm_cold_rates(data: Path, sids: Path) -> dict:
    """Harmful rate (H <= 1) over the look-alike pairs whose items are both warm (fit items)
    and over those with a cold member (never trained on, encoded from content alone)."""
    ds = load_dataset(data)
    if ds.world is None:
        return {}
    table = read_parquet(sids, SID_TABLE).sort("item_id")
    codes = np.stack(table["sid"].to_numpy())
    row_of = np.full(int(table["item_id"].max()) + 1, -1, dtype=np.int64)
    row_of[table["item_id"].to_numpy()] = np.arange(table.height)
    cold = np.zeros(len(row_of), dtype=bool)
    cold[ds.items["item_id"].to_numpy()] = ds.items["is_cold"].to_numpy()
    pairs = ds.world.lookalike_pairs
    ham = (codes[row_of[pairs[:, 0]]] != codes[row_of[pairs[:, 1]]]).sum(axis=1)
    has_cold = cold[pairs].any(axis=1)
    out = {"harmful_cold_pairs": int(has_cold.sum())}
    for label, sel in (("warm", ~has_cold), ("cold", has_cold)):
        out[f"harmful_{label}_rate"] = float((ham[sel] <= 1).mean()) if sel.any() else float("nan")
    return out


def run_one(job: dict) -> tuple[dict, dict | None]:
    """Train one (dataset, tokenizer, seed): (its metrics with the warm / cold split, its
    history when diagnosing). A top-level function, so a process pool can run it."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    print(f"start {job['name']} on {job['data']} seed {job['seed']}", flush=True)
    metrics = train_tokenizer(job["data"], job["name"], job["out"], device=job["device"],
                              epochs=job["epochs"], seed=job["seed"],
                              overrides=job["overrides"], diagnose=job["diagnose"],
                              forces_every=job["forces_every"])
    metrics.update(warm_cold_rates(job["data"], job["out"] / "sids.parquet"),
                   data=str(job["data"]))
    history = json.loads((job["out"] / "history.json").read_text()) if job["diagnose"] else None
    return metrics, history


def _results(jobs: list[dict], workers: int):
    """`run_one` of each job, in job order, as each finishes (a process pool when workers > 1)."""
    if workers <= 1:
        yield from map(run_one, jobs)
        return
    # spawn: a forked child would inherit the parent's torch thread pool state
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(run_one, jobs)


def summary_table(runs: list[dict], names: list[str]) -> str:
    """Markdown: one row per tokenizer, mean ± sd over its runs (sd with ddof 1)."""
    table = ["| tokenizer | runs | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|"]
    for name in names:
        mine = [r for r in runs if r["tokenizer"] == name]
        cells = []
        for key in KEYS:
            values = np.array([r[key] for r in mine if key in r], dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                cells.append("-")
                continue
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.4f} ± {sd:.4f}")
        table.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(table)


def _probe_series(history: dict, group: str, what: str) -> np.ndarray:
    """One probe statistic per epoch of a run's history (NaN where the epoch has none)."""
    values = []
    for record in history["epochs"]:
        probe = record.get("probe", {}).get(group)
        if probe is None:
            values.append(np.nan)
        elif what == "distance_ratio":
            values.append(probe["mean_distance"] / record["probe"]["reference_distance"])
        elif what in PROBE_REASONS:
            occ = probe["occurrences"]
            values.append(probe["reasons"][what] / occ if occ else np.nan)
        else:
            values.append(probe[what])
    return np.array(values, dtype=np.float64)


def plot_diagnostics(histories: dict[str, list[dict]], path: Path) -> Path:
    """Per tokenizer (mean over runs), over training: the look-alike pairs' H <= 1 share and
    latent distance, the share of their in-batch meetings the repulsion acts on and that
    CVPM drops (by reason), and the near-duplicates' H <= 1 share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("harmful", "rate_h_le_1", "look-alikes sharing >= 2 of 3 codes (fit items)"),
        ("harmful", "distance_ratio", "look-alike latent distance / random pairs'"),
        ("harmful", "pushed_share", "look-alike meetings the repulsion acts on"),
        ("harmful", "exclusions", "look-alike meetings CVPM drops, by reason"),
        ("harmful", "mean_push", "mean push |dλL/dd| per look-alike meeting"),
        ("benign", "rate_h_le_1", "near-duplicates sharing >= 2 of 3 codes (fit items)"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (group, what, title) in zip(axes.flat, panels):
        for c, (name, runs) in enumerate(histories.items()):
            color = colors[c % len(colors)]
            if what == "exclusions":
                for reason, style in (("far", "-"), ("collaborative", "--"),
                                      ("near_duplicate", ":")):
                    series = np.nanmean([_probe_series(h, group, reason) for h in runs], axis=0)
                    ax.plot(np.arange(1, len(series) + 1), series, style, color=color,
                            label=f"{name}: {reason}")
                continue
            series = np.array([_probe_series(h, group, what) for h in runs])
            mean = np.nanmean(series, axis=0)
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, color=color, label=f"{name} ({len(runs)} runs)")
            if len(runs) > 1:
                sd = np.nanstd(series, axis=0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.15)
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=7)
    fig.suptitle("look-alike (harmful) and near-duplicate (benign) pairs during training "
                 "(mean ± sd over runs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--paired", action="store_true",
                        help="train seed k on the k-th --data folder only (as many seeds as "
                             "folders) instead of every seed on every folder")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="override key=value (repeatable)")
    parser.add_argument("--diagnose", action="store_true",
                        help="record the look-alike / near-duplicate pairs during training")
    parser.add_argument("--forces-every", type=int, default=0,
                        help="with --diagnose: attribute the pairs' distance changes to the "
                             "loss terms at every k-th step (0: off; costs ~5 backward passes)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="with --diagnose: draw the pair diagnostics into this PNG")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0 = torch default; 1 on a shared box, where idle "
                             "threads spinning at every op's barrier slow the step manyfold)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paired and len(args.seeds) != len(args.data):
        raise SystemExit(f"--paired needs one seed per --data folder, got {len(args.seeds)} "
                         f"seeds for {len(args.data)} folders")
    if (args.plot is not None or args.forces_every) and not args.diagnose:
        raise SystemExit("--plot and --forces-every need --diagnose")
    pairs = list(zip(args.data, args.seeds)) if args.paired else \
        [(d, s) for d in args.data for s in args.seeds]
    overrides = parse_sets(args.sets)
    jobs = []
    for name in args.tokenizers:
        for data, seed in pairs:
            tag = f"{data.name}_" if len(args.data) > 1 else ""
            out = args.out / f"{tag}{name.replace('+', '_')}_s{seed}"
            jobs.append({"data": data, "name": name, "out": out, "seed": seed,
                         "device": args.device, "epochs": args.epochs, "overrides": overrides,
                         "diagnose": args.diagnose, "forces_every": args.forces_every,
                         "threads": args.threads})
    runs, histories = [], {}
    for job, (metrics, history) in zip(jobs, _results(jobs, args.jobs)):
        runs.append(metrics)
        if history is not None:
            histories.setdefault(job["name"], []).append(history)
        print(json.dumps({"tokenizer": job["name"], "data": str(job["data"]), "seed": job["seed"],
                          **{k: metrics.get(k) for k in KEYS}}), flush=True)
    text = summary_table(runs, args.tokenizers)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"overrides": overrides, "runs": runs},
                                                      indent=2) + "\n")
    (args.out / "quality.md").write_text(text + "\n")
    if args.plot is not None:
        print(f"wrote {plot_diagnostics(histories, args.plot)}")


if __name__ == "__main__":
    main()

"""Summarize a sweep of tokenizer settings on the synthetic worlds (issue 15 item 6): harmful /
benign collision rates per variant, mean ± sd over worlds, and the paired change against a
reference run of the same world and seed (e.g. the recorded default quasid / uniform runs).

    python benchmarks/collision_sweep.py hw40=runs/sweep/hw40_w* hw80=runs/sweep/hw80_w* \
        --reference benchmarks/results/collisions/new_world.json \
        --json benchmarks/results/collisions/sweep.json --md benchmarks/results/collisions/sweep.md

Each NAME=DIR[,DIR...] names one variant and the `tokenizer_quality.py --out DIR` folders of
its runs (their quality.json, one run or several). A world is identified by the run's world
statistics (fit items, cold items, collaborative positive pairs) and seed, so the reference
runs pair with the sweep runs only where the world regenerated identically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RATES = ("harmful_collision_rate", "harmful_full_collision_rate", "benign_collision_rate",
         "benign_full_collision_rate", "collision_rate", "harmful_warm_rate",
         "harmful_cold_rate", "train_seconds")
SHORT = {"harmful_collision_rate": "harmful (H<=1)", "harmful_full_collision_rate":
         "harmful full (H=0)", "benign_collision_rate": "benign (H<=1)",
         "benign_full_collision_rate": "benign full (H=0)", "collision_rate": "collision rate",
         "harmful_warm_rate": "harmful warm", "harmful_cold_rate": "harmful cold",
         "train_seconds": "train s"}


def world_key(run: dict) -> tuple:
    """What identifies a run's world: its seed and the world statistics it recorded."""
    return (run["seed"], run["fit_items"], run["cold_items"], run["positive_pairs"])


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every run of the folders' quality.json (folders without one are skipped), each with its
    overrides and folder."""
    runs = []
    for d in dirs:
        q = d / "quality.json"
        if q.exists():
            data = json.loads(q.read_text())
            for r in data["runs"]:
                runs.append({**r, "overrides": data["overrides"], "dir": str(d)})
    return runs


def mean_sd(values: list[float]) -> dict:
    """Mean, sample sd (0 for one value) and count."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=DIR[,DIR...]")
    parser.add_argument("--reference", type=Path, action="append", default=[],
                        help="tokenizer_quality.py quality.json (or a copy) with reference runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    args = parser.parse_args()

    groups: dict[str, list[dict]] = {}
    for ref in args.reference:
        data = json.loads(ref.read_text())
        tag = f" {json.dumps(data['overrides'])}" if data["overrides"] else ""
        for r in data["runs"]:
            groups.setdefault(f"recorded {r['tokenizer']}{tag}", []).append(
                {**r, "overrides": data["overrides"], "dir": str(ref)})
    for item in args.variants:
        name, _, dirs = item.partition("=")
        groups[name] = load_runs([Path(d) for d in dirs.split(",")])
    base = {world_key(r): r for r in groups.get("recorded quasid", [])}

    out, lines = {}, []
    header = ["variant", "overrides", "worlds"] + [SHORT[k] for k in RATES] + \
        ["paired change harmful vs recorded quasid", "paired change benign"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, runs in groups.items():
        if not runs:
            continue
        figures = {k: mean_sd([r[k] for r in runs]) for k in RATES}
        paired = [(r["harmful_collision_rate"] - base[world_key(r)]["harmful_collision_rate"],
                   r["benign_collision_rate"] - base[world_key(r)]["benign_collision_rate"])
                  for r in runs if world_key(r) in base]
        figures["paired_vs_recorded_quasid"] = {
            "harmful": mean_sd([p[0] for p in paired]) if paired else None,
            "benign": mean_sd([p[1] for p in paired]) if paired else None}
        out[name] = {"overrides": runs[0]["overrides"], "figures": figures,
                     "runs": [{k: r.get(k) for k in (*RATES, "seed", "data", "dir",
                                                     "fit_items", "cold_items",
                                                     "positive_pairs")} for r in runs]}
        cells = [name, json.dumps(runs[0]["overrides"]) if runs[0]["overrides"] else "-",
                 str(len(runs))]
        for k in RATES:
            f = figures[k]
            cells.append(f"{f['mean']:.1f}" if k == "train_seconds" else
                         f"{f['mean']:.3f} ± {f['sd']:.3f}")
        for key in ("harmful", "benign"):
            p = figures["paired_vs_recorded_quasid"][key]
            cells.append(f"{p['mean']:+.3f} ± {p['sd']:.3f} (n={p['n']})" if p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    text = "\n".join(lines)
    args.md.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

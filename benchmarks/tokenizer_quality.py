"""SID quality of each tokenizer on one dataset, over seeds: the issue-4 targets, measured.

Runs `quasid.tokenizer.train.train_tokenizer` for every (tokenizer, seed) and prints one row per
tokenizer with the mean ± standard error over seeds of collision rate, SID entropy, and,
on the synthetic world, the harmful / benign collision rates; writes every run's metrics.

    python benchmarks/tokenizer_quality.py --data DIR --out runs/tq --device cuda --seeds 0 1 2
    python benchmarks/tokenizer_quality.py --data DIR --out runs/tq --set hamr_weight=5 \
        --tokenizers quasid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from quasid.tokenizer.train import train_tokenizer

TOKENIZERS = ("rqkmeans", "rqvae", "quasid", "uniform", "adasid", "rqvae+hamr", "adasid+hamr")
KEYS = ("collision_rate", "sid_entropy", "harmful_collision_rate", "benign_collision_rate",
        "codebook_utilization", "train_seconds")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="override key=value (repeatable)")
    args = parser.parse_args()
    overrides = parse_sets(args.sets)
    runs = []
    for name in args.tokenizers:
        for seed in args.seeds:
            out = args.out / f"{name.replace('+', '_')}_s{seed}"
            metrics = train_tokenizer(args.data, name, out, device=args.device, epochs=args.epochs,
                                      seed=seed, overrides=overrides)
            runs.append(metrics)
            print(json.dumps({"tokenizer": name, "seed": seed,
                              **{k: metrics.get(k) for k in KEYS}}), flush=True)
    table = ["| tokenizer | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name in args.tokenizers:
        cells = []
        for key in KEYS:
            values = np.array([r[key] for r in runs if r["tokenizer"] == name and key in r])
            if len(values) == 0:
                cells.append("-")
                continue
            se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.4f} ± {se:.4f}")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"overrides": overrides, "runs": runs},
                                                      indent=2) + "\n")
    (args.out / "quality.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Calibration of the training-replicate design: CI coverage with a known training spread.

Each simulated experiment has two arms of R replicate cells. A cell's estimate is its
training draw (N(0, training_sd²): another seed, another model) plus its users' noise
(N(0, user_sd²)); the true effect is 0, since both arms draw their trainings from the same
distribution (an A/A in training as well as in users). `analysis.stats.replicate_test`
gives the replicate-aware CI; the users-only CI is effect ± z·user_se, what a single
training draw per arm reports. Prints the coverage of both over `--experiments` runs per
setting.

    python benchmarks/replicate_calibration.py --experiments 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from analysis.stats import replicate_test


def coverage(replicates: int, training_sd: float, user_sd: float, experiments: int,
             rng: np.random.Generator) -> dict:
    """Coverage of the true (zero) effect by the replicate-aware and users-only 95% CIs."""
    shape = (experiments, replicates)
    control = training_sd * rng.standard_normal(shape) + user_sd * rng.standard_normal(shape)
    treatment = training_sd * rng.standard_normal(shape) + user_sd * rng.standard_normal(shape)
    user_var = np.full(replicates, user_sd**2)
    aware = users = 0
    widths = []
    for c, t in zip(control, treatment):
        res = replicate_test(c, user_var, t, user_var)
        aware += res.abs_ci_low <= 0.0 <= res.abs_ci_high
        users += abs(res.abs_effect) <= 1.959964 * res.user_se
        widths.append((res.abs_ci_high - res.abs_ci_low) / (2 * 1.959964 * res.user_se))
    return {"replicates": replicates, "training_sd": training_sd, "user_sd": user_sd,
            "experiments": experiments, "coverage_replicate_aware": aware / experiments,
            "coverage_users_only": users / experiments,
            "median_width_ratio": float(np.median(widths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for replicates in (2, 3, 5, 8):
        for ratio in (0.0, 0.5, 1.0, 2.0):  # training SD in units of the users' SD
            print(json.dumps(coverage(replicates, ratio * 1.0, 1.0, args.experiments, rng)),
                  flush=True)


if __name__ == "__main__":
    main()

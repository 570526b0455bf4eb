"""Statistics for 50 metrics × 10 segments (one treatment arm): target under 1 s.

Times what the analysis does after DuckDB hands over the sufficient statistics: choosing
each cell's test (CUPED fallback checks), running every test (vectorized per method),
the multiplicity correction and building the result rows. The statistics are synthetic
moments of the right shapes (means, ratios, each with and without a covariate).

Usage: python benchmarks/analysis_statistics.py [--metrics 50 --segments 10 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from analysis.engine import make_rows, plan_tests, run_jobs
from analysis.metrics import Cell, Metric
from analysis.stats import Moments, TestConfig


def _moments(rng: np.random.Generator, k: int, n: int) -> Moments:
    values = rng.lognormal(0.0, 1.0, (n, k))
    return Moments.of(values)


def make_cells(n_metrics: int, n_segments: int, seed: int = 0) -> list[Cell]:
    """Cells with two arms: a quarter each of mean, mean+CUPED, ratio, ratio+CUPED."""
    rng = np.random.default_rng(seed)
    kinds = [("mean", False), ("mean", True), ("ratio", False), ("ratio", True)]
    cells = []
    for m in range(n_metrics):
        kind, cov = kinds[m % 4]
        metric = Metric(f"m{m}", kind, "value", "1" if kind == "ratio" else None)
        k = (2 if kind == "ratio" else 1) * (2 if cov else 1)
        for s in range(n_segments):
            arms = {a: _moments(rng, k, 200) for a in ("control", "treatment")}
            cells.append(Cell(metric, "all" if s == 0 else f"seg{s}", arms, cov))
    return cells


def main() -> None:
    """Print the best and median time of the statistics stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=int, default=50)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cells = make_cells(args.metrics, args.segments)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jobs, _ = plan_tests(cells, "control", ["treatment"])
        results = run_jobs(jobs, TestConfig(0.05))
        rows = make_rows(jobs, results, "bh")
        times.append(time.perf_counter() - t0)
    print(f"{len(rows)} rows ({args.metrics} metrics × {args.segments} segments): best "
          f"{min(times):.3f} s, median {float(np.median(times)):.3f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()

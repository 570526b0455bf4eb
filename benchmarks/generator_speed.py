"""Time the synthetic world generator at a given size (generation and writing separately).

Usage: python benchmarks/generator_speed.py --items 1000000 --users 1000000 [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from quasid.data.dataset import write_dataset
from quasid.data.synthetic import WorldConfig, datacard, generate


def main() -> None:
    """Generate one world, print the seconds for each stage and the peak memory."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = WorldConfig(n_items=args.items, n_users=args.users, seed=args.seed)
    t0 = time.perf_counter()
    items, interactions, world = generate(cfg, progress=True)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "world"
        write_dataset(out, items, interactions, datacard(cfg, items, interactions, world), world)
        t2 = time.perf_counter()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"items={cfg.n_items:,} users={cfg.n_users:,} interactions={interactions.height:,}")
    print(f"generate {t1 - t0:.1f} s, validate+write {t2 - t1:.1f} s, total {t2 - t0:.1f} s, "
          f"peak RSS {peak_gib:.1f} GiB")


if __name__ == "__main__":
    main()

"""Simulator throughput and memory: requests per second with K = 10, and peak RSS vs days.

    python benchmarks/simulator_speed.py                       # 200,000 users, 20,000 items
    python benchmarks/simulator_speed.py --users 20000 --items 5000 --memory-days 3,14
    python benchmarks/simulator_speed.py --data DIR --stack STACK_DIR --device cuda  # SID stacks

Generates a synthetic world (or reads `--data`), then runs a popularity-vs-popularity
experiment through `simulator.replay.run_experiment` in one process (one shard unless
`--shards`), timing the whole run and the serving phase (the shards: stack -> world ->
events -> Parquet). Throughput = requests served (experiment + pre-period) / seconds.
With `--memory-days a,b,...` it reruns the experiment once per window length in a fresh
process and reports each run's peak RSS (memory should not grow with the days).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _config(data: Path, days: int, pre_days: int, batch: int, stack: str = "popularity",
            device: str = "cpu") -> dict:
    return {
        "experiment_id": "speed", "seed": 0, "data": {"path": str(data)},
        "arms": [{"name": "control", "stack": stack, "allocation": 0.5},
                 {"name": "treatment", "stack": stack, "allocation": 0.5}],
        "days": days, "pre_days": pre_days, "slate_size": 10, "batch_size": batch,
        "cohorts": [{"name": "premium", "level": "item", "expr": "price > 40"}],
        "serving_device": device,
    }


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(data: Path, days: int, pre_days: int, shards: int, batch: int,
            stack: str = "popularity", device: str = "cpu") -> dict:
    """Run one experiment and time it; returns the figures."""
    from simulator import replay, rundir

    config = _config(data, days, pre_days, batch, stack, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        rundir.prepare(config, out, shards)
        t1 = time.perf_counter()
        served = 0
        for shard in range(shards):
            record = replay.run_shard(config, shard, shards, out)
            served += sum(row["requests"] for period in record["counts"].values()
                          for row in period.values())
        t2 = time.perf_counter()
        manifest = rundir.finalize(config, out, shards)
        t3 = time.perf_counter()
        events = sum(row["impressions"] + row["clicks"] + row["orders"] + row["cancels"]
                     for period in ("experiment", "pre")
                     for row in manifest["counts"][period].values())
        size = sum(p.stat().st_size for p in (out / "events").rglob("*.parquet"))
    return {"stack": stack, "device": device, "days": days, "pre_days": pre_days,
            "shards": shards, "requests": served,
            "events": events, "events_mib": round(size / 2**20, 1),
            "prepare_s": round(t1 - t0, 2), "serve_s": round(t2 - t1, 2),
            "total_s": round(t3 - t0, 2),
            "requests_per_s_serving": round(served / (t2 - t1)),
            "requests_per_s_end_to_end": round(served / (t3 - t0)),
            "peak_rss_gib": round(_peak_rss_gib(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing dataset folder (else generated)")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--pre-days", type=int, default=7)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--stack", default="popularity",
                        help="both arms' stack: popularity, random or a saved SID stack folder")
    parser.add_argument("--device", default="cpu", help="serving device of saved SID stacks")
    parser.add_argument("--memory-days", default="", help="e.g. 3,14: peak RSS per window length")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:  # a child of --memory-days: one measurement, JSON on stdout
        print(json.dumps(measure(args.data, args.days, args.pre_days, args.shards, args.batch)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        generated = None
        if data is None:
            from quasid.data.synthetic import WorldConfig, synthesize

            data = Path(tmp) / "world"
            t = time.perf_counter()
            card = synthesize(WorldConfig(n_items=args.items, n_users=args.users), data)
            generated = {"seconds": round(time.perf_counter() - t, 1), **card["counts"]}
            print(f"generated {data}: {card['counts']} in {generated['seconds']} s")
        result = {"data": str(args.data or "generated"), "generated": generated,
                  "run": measure(data, args.days, args.pre_days, args.shards, args.batch,
                                 args.stack, args.device)}
        print(json.dumps(result["run"], indent=2))
        memory = []
        for days in [int(d) for d in args.memory_days.split(",") if d]:
            cmd = [sys.executable, __file__, "--single", "--data", str(data), "--days", str(days),
                   "--pre-days", "0", "--shards", str(args.shards), "--batch", str(args.batch)]
            child = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1])
            memory.append(child)
            print(f"days={days}: {child['requests']:,} requests, {child['events']:,} events, "
                  f"peak RSS {child['peak_rss_gib']} GiB, "
                  f"{child['requests_per_s_serving']:,} req/s")
        result["memory_by_days"] = memory
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

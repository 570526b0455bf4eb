"""Simulator throughput and memory: requests per second with K = 10, and peak RSS vs days.

    python benchmarks/simulator_speed.py                       # 200,000 users, 20,000 items
    python benchmarks/simulator_speed.py --users 20000 --items 5000 --memory-days 3,14
    python benchmarks/simulator_speed.py --data DIR --stack STACK_DIR --device cuda  # SID stacks
    python benchmarks/simulator_speed.py --data DIR --floor     # the box's limits, per kernel

Generates a synthetic world (or reads `--data`), then runs a popularity-vs-popularity
experiment through `simulator.replay.run_experiment` in one process (one shard unless
`--shards`), timing the whole run and the serving phase (the shards: stack -> world ->
events -> Parquet). Throughput = requests served (experiment + pre-period) / seconds.
The serving phase's CPU seconds (all threads, and the main thread alone) are printed
too: on a shared box they move much less than wall seconds.
With `--memory-days a,b,...` it reruns the experiment once per window length in a fresh
process and reports each run's peak RSS (memory should not grow with the days).
With `--floor` it also times the work no implementation can skip, kernel by kernel on the
first experiment day's requests, and the machine's copy bandwidth (`floor`).
With `--compare OLD_ROOT --rounds N` it alternates the same measurement in fresh processes
on another checkout's code (`PYTHONPATH=OLD_ROOT`, e.g. `git archive main | tar -x -C
OLD_ROOT`) and on this one's, N rounds, so both see the same load on a shared box; the
ratio of the medians is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def _cpu_s() -> float:
    """CPU seconds of this process so far, all threads (polars' pool and the writer too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
        cpu1, main1 = _cpu_s(), time.thread_time()
        served = 0
        for shard in range(shards):
            record = replay.run_shard(config, shard, shards, out)
            served += sum(row["requests"] for period in record["counts"].values()
                          for row in period.values())
        t2 = time.perf_counter()
        cpu2, main2 = _cpu_s(), time.thread_time()
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
            "serve_cpu_s": round(cpu2 - cpu1, 2), "serve_main_thread_cpu_s": round(main2 - main1, 2),
            "cpu_us_per_request": round((cpu2 - cpu1) / served * 1e6, 2),
            "load_average": float(open("/proc/loadavg").read().split()[0]),
            "peak_rss_gib": round(_peak_rss_gib(), 2)}


class _Given:
    """A world that returns fixed probabilities: `respond` through it costs the draws alone."""

    def __init__(self, world, probabilities):
        self.name, self.p = "given", probabilities
        self.cancel_rate, self.quantity_extra = world.cancel_rate, world.quantity_extra

    def probabilities(self, users, items):
        return self.p


def _best_cpu(fn, reps: int) -> float:
    """Least CPU seconds (this thread) of `reps` calls: the cost without the box's noise."""
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def _best_process_cpu(fn, reps: int) -> tuple[float, float]:
    """Least (process CPU, wall) seconds of `reps` calls, for multi-threaded (polars) work."""
    cpu = wall = float("inf")
    for _ in range(reps):
        c, w = _cpu_s(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, _cpu_s() - c), min(wall, time.perf_counter() - w)
    return cpu, wall


def floor(data: Path, batch: int, reps: int = 5) -> dict:
    """What the box could do: each kernel of serving timed alone on the first experiment
    day's requests (best of `reps`, CPU seconds), summed per request, on 2 cores; and the
    copy bandwidth against the bytes of event rows built and encoded per request."""
    import numpy as np
    import polars as pl

    from quasid.core.io import write_frame_atomic
    from quasid.core.schemas import EVENTS, validate
    from simulator.events import event_frame
    from simulator.replay import _stacks
    from simulator.responses import TrueWorld, respond
    from simulator.rundir import as_config, load_context

    cfg = as_config(_config(data, 1, 0, batch))
    ctx = load_context(cfg)
    world = TrueWorld(ctx.dataset.world)
    stack = _stacks(cfg, ctx, None)["control", 0]
    day = ctx.traffic.experiment.filter(pl.col("day") == 0).sort("request_id")
    k = cfg.slate_size
    kernels = dict.fromkeys(("histories", "stack", "truth", "draws", "rows"), 0.0)
    frames = []
    for start in range(0, day.height, batch):
        part = day.slice(start, batch)
        req = {c: part[c].to_numpy() for c in ("request_id", "user_id", "ts", "day")}
        n = len(req["request_id"])
        hist = ctx.logs.histories(req["request_id"], cfg.history_len)
        kernels["histories"] += _best_cpu(
            lambda r=req: ctx.logs.histories(r["request_id"], cfg.history_len), reps)
        items, _ = stack.recommend(hist, k, req["user_id"])
        kernels["stack"] += _best_cpu(lambda h=hist, r=req: stack.recommend(h, k, r["user_id"]),
                                      reps)
        p = world.probabilities(req["user_id"], items)
        kernels["truth"] += _best_cpu(lambda r=req, i=items: world.probabilities(r["user_id"], i),
                                      reps)
        given = _Given(world, p)
        responses = respond(given, req["user_id"], items, req["request_id"], cfg.seed)
        kernels["draws"] += _best_cpu(
            lambda r=req, i=items, g=given: respond(g, r["user_id"], i, r["request_id"], cfg.seed),
            reps)
        rows = ctx.catalog.rows(items)
        flags = ({"is_cold_item": ctx.catalog.is_cold[rows], "cohort_premium": ctx.catalog.price[rows] > 40},
                 {"is_cold_user": np.zeros(n, dtype=bool), "replicate": np.zeros(n, np.int16)})
        arm = np.zeros(n, dtype=np.int64)
        args = ("speed", ["control", "treatment"], arm, req, items, responses,
                ctx.catalog.price[rows], *flags)
        frames.append(event_frame(*args))
        kernels["rows"] += _best_cpu(lambda a=args: event_frame(*a), reps)
    frame = pl.concat(frames)
    n_req = day.height
    validate_cpu, validate_wall = _best_process_cpu(lambda: validate(frame, EVENTS), reps)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "day.parquet"
        write_cpu, write_wall = _best_process_cpu(lambda: write_frame_atomic(frame, target), reps)
        file_bytes = target.stat().st_size
    src = np.ones(2**25)  # 256 MiB
    dst = np.empty_like(src)
    copy_s = min(_best_process_cpu(lambda: np.copyto(dst, src), 1)[1] for _ in range(reps))
    copy_gb_s = src.nbytes / copy_s / 1e9
    per_request_us = {name: round(v / n_req * 1e6, 3) for name, v in kernels.items()}
    per_request_us["validate"] = round(validate_cpu / n_req * 1e6, 3)
    per_request_us["parquet"] = round(write_cpu / n_req * 1e6, 3)
    total_us = sum(per_request_us.values())
    row_bytes = frame.estimated_size() / n_req
    draws_us = per_request_us["truth"] + per_request_us["draws"]
    return {
        "requests": n_req, "events": frame.height, "batch": batch,
        "cpu_us_per_request": per_request_us,
        "kernels_cpu_us_per_request": round(total_us, 2),
        "kernel_floor_requests_per_s_2_cores": round(2e6 / total_us),
        "kernel_floor_requests_per_s_1_core": round(1e6 / total_us),
        "response_model_floor_requests_per_s_1_core": round(1e6 / draws_us),
        "validate_wall_ms": round(validate_wall * 1e3, 1),
        "parquet_wall_ms": round(write_wall * 1e3, 1),
        "event_row_bytes_per_request": round(row_bytes),
        "file_bytes_per_request": round(file_bytes / n_req, 1),
        "copy_gb_per_s": round(copy_gb_s, 2),
        # the rows are written once and read once by the encoder: two passes over their bytes
        "bandwidth_floor_requests_per_s": round(copy_gb_s * 1e9 / (2 * row_bytes)),
    }


def _child(root: Path, data: Path, days: int, pre_days: int, shards: int, batch: int) -> dict:
    """One measurement in a fresh process that imports the simulator from `root`."""
    cmd = [sys.executable, __file__, "--single", "--data", str(data), "--days", str(days),
           "--pre-days", str(pre_days), "--shards", str(shards), "--batch", str(batch)]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(old_root: Path, data: Path, args: argparse.Namespace) -> dict:
    """Alternate before (`old_root`) and after (this checkout) runs; medians and their ratio."""
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for label, root in (("before", old_root.resolve()), ("after", ROOT)):
            child = _child(root, data, args.days, args.pre_days, args.shards, args.batch)
            runs[label].append(child)
            print(f"round {r + 1} {label:6s}: {child['requests_per_s_serving']:,} req/s serving, "
                  f"{child['cpu_us_per_request']} CPU us/request, load {child['load_average']}")
    med = {label: {key: statistics.median(c[key] for c in rs) for key in
                   ("requests_per_s_serving", "cpu_us_per_request", "peak_rss_gib")}
           for label, rs in runs.items()}
    ratio = med["after"]["requests_per_s_serving"] / med["before"]["requests_per_s_serving"]
    cpu_ratio = med["before"]["cpu_us_per_request"] / med["after"]["cpu_us_per_request"]
    print(f"median before {med['before']['requests_per_s_serving']:,.0f} req/s, after "
          f"{med['after']['requests_per_s_serving']:,.0f} req/s: {ratio:.2f}x "
          f"({cpu_ratio:.2f}x less CPU per request)")
    return {"old_root": str(old_root), "rounds": runs, "median": med,
            "speedup_serving": round(ratio, 2), "cpu_per_request_ratio": round(cpu_ratio, 2)}


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
    parser.add_argument("--floor", action="store_true",
                        help="also time each serving kernel alone and the copy bandwidth")
    parser.add_argument("--compare", type=Path, metavar="OLD_ROOT",
                        help="alternate the measurement with another checkout's code")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
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
        if args.compare:
            result["compare"] = compare(args.compare, data, args)
        if args.floor:
            result["floor"] = floor(data, args.batch)
            print(json.dumps(result["floor"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-user aggregation of every registered metric vs a bare DuckDB GROUP BY, in one run.

Target (issue 7): the analysis' per-user aggregation over 100M events / 1M users within 3×
of `SELECT user_id, count(*), sum(value), max(ts) ... GROUP BY user_id` over the same
Parquet. "Ours" is `aggregate_units` + `check_event_arms` on the experiment's events: every
registered metric's per-user sums in every segment (all, user and event cohorts), every
assigned unit (zeros included), arms checked. Both materialize their result into temporary
tables; they alternate `--repeats` times in one process, so a busy machine slows both
alike; wall and CPU seconds (all DuckDB threads) are both reported, the best of each
compared. Then, once each: the per-day pass (daily segments and looks), the whole
statistics collection (adds the pre-period pass for CUPED) and the whole `analyze_run`.

Usage:
  python benchmarks/analysis_aggregation.py --generate --users 1000000 --events 100000000 \\
      --run /work/bench/r100m          # write the fake run once (DuckDB SQL), then measure
  python benchmarks/analysis_aggregation.py --run /work/bench/r100m   # measure an existing run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from analysis.engine import AnalysisConfig, analyze_run
from analysis.fake_events import FakeRunConfig, write_fake_run
from analysis.metrics import (
    aggregate_days,
    aggregate_units,
    check_event_arms,
    collect,
    get_metrics,
    make_plan,
)
from analysis.store import build_store, connect

# events per request at the fake run's defaults: 5 impressions, 10% clicked, 30% of those
# ordered, 10% of orders cancelled
EVENTS_PER_REQUEST = 5 * (1 + 0.1 + 0.1 * 0.3 + 0.1 * 0.3 * 0.1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _wall_cpu(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of `fn()`."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return t1 - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main() -> None:
    """Measure and print the figures (and a JSON line for the README)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--pre-days", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    console = Console()
    if args.generate:
        per_user_day = args.events / EVENTS_PER_REQUEST / args.users / args.days
        cfg = FakeRunConfig(experiment_id="bench", n_users=args.users, days=args.days,
                            pre_days=args.pre_days, requests_per_user_day=per_user_day)
        with console.status(f"writing {args.events:,} events to {args.run}"):
            seconds = _timed(lambda: write_fake_run(args.run, cfg, threads=args.threads))
        console.print(f"generated in {seconds:.1f} s")
    manifest = json.loads((args.run / "manifest.json").read_text())
    exp = manifest["experiment_id"]
    db = args.run.parent / f"{args.run.name}.bench.duckdb"
    info = build_store(args.run, db)
    metrics = get_metrics()
    no_pre = dataclasses.replace(info, has_pre_period=False)
    glob = str(args.run / "events" / f"experiment_id={exp}" / "**" / "*.parquet")
    bare_sql = (f"CREATE OR REPLACE TEMP TABLE bare AS SELECT user_id, count(*) AS n, "
                f"sum(value) AS v, max(ts) AS t FROM read_parquet('{glob}', "
                f"hive_partitioning = true) GROUP BY user_id")
    wall: dict[str, list[float]] = {"bare": [], "ours": []}
    cpu: dict[str, list[float]] = {"bare": [], "ours": []}

    def ours() -> None:
        aggregate_units(con, plan)
        check_event_arms(con, plan)

    with connect(db, threads=args.threads) as con:
        n_events, n_users = con.execute(
            f"SELECT count(*), count(DISTINCT user_id) FROM read_parquet('{glob}')").fetchone()
        plan = make_plan(metrics, no_pre)
        for i in range(args.repeats):
            for name, fn in (("bare", lambda: con.execute(bare_sql)), ("ours", ours)):
                with console.status(f"repeat {i + 1}/{args.repeats}: {name}"):
                    w, c = _wall_cpu(fn)
                wall[name].append(w)
                cpu[name].append(c)
        rows = con.execute("SELECT count(*) FROM user_flags").fetchone()[0]
        with console.status("per-day pass"):
            day_wall, day_cpu = _wall_cpu(lambda: aggregate_days(con, plan))
        user_days = con.execute("SELECT count(*) FROM user_day").fetchone()[0]
        with console.status("collect: every segment, day and look, CUPED covariates"):
            t_collect = _timed(lambda: collect(con, metrics, info))
    with console.status("analyze_run (whole analysis, no report)"):
        t0 = time.perf_counter()
        result = analyze_run(args.run, db, AnalysisConfig(threads=args.threads))
        t_analyze = time.perf_counter() - t0
    db.unlink(missing_ok=True)
    best = {k: (min(wall[k]), min(cpu[k])) for k in wall}
    table = Table(title=f"{n_events:,} events, {n_users:,} active users "
                        f"({manifest['counts'].get('users', '?'):,} assigned); {rows:,} "
                        f"user×flag rows, {user_days:,} user-days; DuckDB {duckdb.__version__}, "
                        f"{args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    for col in ("measure", "best wall s", "best CPU s", "all runs wall / CPU s"):
        table.add_column(col)
    for name, label in (("bare", "bare GROUP BY user_id (3 aggregates)"),
                        ("ours", f"per-user aggregation: {len(metrics)} metrics, "
                                 f"{len(plan.segments)} segments")):
        table.add_row(label, f"{best[name][0]:.2f}", f"{best[name][1]:.2f}",
                      ", ".join(f"{w:.1f}/{c:.1f}" for w, c in zip(wall[name], cpu[name])))
    table.add_row("ratio (target < 3)", f"{best['ours'][0] / best['bare'][0]:.2f}",
                  f"{best['ours'][1] / best['bare'][1]:.2f}", "")
    table.add_row("per-day pass (days, looks)", f"{day_wall:.2f}", f"{day_cpu:.2f}", "")
    table.add_row("collect: + pre-period, segments, days, looks", f"{t_collect:.2f}", "", "")
    table.add_row("analyze_run (no report)", f"{t_analyze:.2f}", "",
                  ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    console.print(table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"events": n_events, "users": n_users, "user_flag_rows": rows,
                      "user_days": user_days, "wall_s": wall, "cpu_s": cpu,
                      "ratio_wall": best["ours"][0] / best["bare"][0],
                      "ratio_cpu": best["ours"][1] / best["bare"][1],
                      "day_pass_wall_cpu_s": [day_wall, day_cpu], "collect_s": t_collect,
                      "analyze_s": t_analyze, "timings": result.timings,
                      "peak_rss_gib": peak, "load_avg": os.getloadavg()}))

if __name__ == "__main__":
    main()

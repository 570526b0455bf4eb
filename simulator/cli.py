"""`quasid simulate --config experiment.yaml --out DIR`: run a simulated experiment.

Registered on the `quasid` app by `flows.cli` (`register(app)`); the engine is imported
inside the command so `quasid --help` stays fast.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def simulate(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (see configs/ and "
                                                      "simulator/config.py for every field)."),
    out: Path = typer.Option(..., "--out", help="Run directory: assignments.parquet, events/, "
                                                "manifest.json. A rerun resumes it."),
    shards: int = typer.Option(1, help="Shards (users split by bucket); the events do not "
                                       "depend on it, but a run directory keeps its count."),
    workers: int = typer.Option(1, help="Processes running shards in parallel."),
) -> None:
    """Replay logged traffic through each arm's stack and the world; write events.

    The config, data, slate and stacks are checked before anything is written; the run
    directory is locked (one run at a time); Ctrl-C stops within one batch (exit 130).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    from quasid.core.config import ConfigError
    from simulator.config import load_config
    from simulator.replay import run_experiment
    from simulator.rundir import RunDirError

    from quasid.core.cli import error_line
    from quasid.core.interrupt import stop_on_sigint
    from quasid.core.lock import LockError, acquire, describe
    from simulator.preflight import check_experiment

    try:
        cfg = load_config(config)
        check_experiment(cfg, source=str(config))  # every check before the first write
    except ConfigError as exc:
        typer.echo(error_line(exc), err=True)
        raise typer.Exit(2) from None
    console = Console()
    try:
        lock = acquire(out, cfg.fingerprint(), "quasid simulate")
    except LockError as exc:
        typer.echo(error_line(exc), err=True)
        raise typer.Exit(2) from None
    if lock.took_over:
        console.print(f"took over the lock of a run that died ({describe(lock.took_over)})")
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    try:
        with stop_on_sigint(), Progress(*columns, console=console, transient=False) as bar:
            if workers > 1:
                task = bar.add_task(f"{cfg.experiment_id}: shards", total=shards)
                # spawn, not fork: a forked child inherits polars' and torch's thread pools
                # mid-lock and can hang
                spawn = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
                    def map_fn(fn, items):
                        for record in pool.map(fn, items):
                            bar.advance(task)
                            yield record
                    manifest = run_experiment(cfg, out, n_shards=shards, map_fn=map_fn)
            else:
                task = bar.add_task(f"{cfg.experiment_id}: assignments, world", total=None)
                manifest = run_experiment(
                    cfg, out, n_shards=shards,
                    progress=lambda n: bar.advance(task, n),
                    on_prepared=lambda total: bar.update(
                        task, total=total, description=f"{cfg.experiment_id}: requests"))
    except (ConfigError, RunDirError, ValueError, FileNotFoundError) as exc:
        typer.echo(error_line(exc), err=True)
        raise typer.Exit(2) from None
    finally:
        lock.release()
    _print_summary(console, manifest, out)


def _print_summary(console: Console, manifest: dict, out: Path) -> None:
    from simulator.rundir import summary_table

    table = Table(title=f"{manifest['experiment_id']}: {manifest['days']} days, "
                        f"slate {manifest['slate_size']}, world {manifest['world']['kind']}")
    heads = ("arm", "users", "requests", "impressions", "CTR", "orders", "completed",
             "conversion", "GMV", "GMV/user")
    for head in heads:
        table.add_column(head, justify="left" if head == "arm" else "right")
    for row in summary_table(manifest):
        arm = row["arm"] + (" (control)" if row["arm"] == manifest["control"] else "")
        table.add_row(arm, f"{row['users']:,}", f"{row['requests']:,}", f"{row['impressions']:,}",
                      f"{row['ctr']:.2%}", f"{row['orders']:,}", f"{row['completed_orders']:,}",
                      f"{row['conversion']:.2%}", f"{row['gmv']:,.2f}",
                      f"{row['gmv_per_user']:.2f}")
    console.print(table)
    counts = manifest["counts"]
    pre = sum(c["requests"] for c in counts["pre"].values())
    console.print(f"pre-period ({manifest['pre_experiment_id']}): {pre:,} requests; "
                  f"held out {counts['held_out']:,}, not allocated {counts['not_allocated']:,} "
                  f"of {counts['units_in_window']:,} users in the window")
    if manifest["effects"]:
        console.print("injected effects: " + ", ".join(
            f"{e['arm']} {e['on']} x{e['factor']}" for e in manifest["effects"]))
    console.print(f"wrote {out} (assignments.parquet, events/, manifest.json)")


def register(app: typer.Typer) -> None:
    """Add the `simulate` command to a typer app (the `quasid` console command)."""
    app.command("simulate")(simulate)

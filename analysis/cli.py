"""The `quasid analyze` command (registered on the console app by `flows.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer


def analyze_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory: assignments.parquet, events/, "
                                             "manifest.json."),
    out: Path = typer.Option(..., "--out", help="Output folder for report.md, report.html, "
                                                "results.json, details.json, plots/."),
    alpha: float = typer.Option(0.05, help="Significance level (two-sided)."),
    control: str = typer.Option(None, help="Control arm (default: the manifest's control)."),
    correction: str = typer.Option("bh", help="Multiplicity correction within each family "
                                              "(primary metrics × arms; secondary; guardrail; "
                                              "segments and days exploratory): bh or holm."),
    metric: list[str] = typer.Option(None, "--metric", help="Metric to analyse (repeatable; "
                                                            "default: every registered metric)."),
    bootstrap: int = typer.Option(0, help="Poisson bootstrap replicates for the CIs of mean "
                                          "metrics (0 = off; e.g. 1000 for heavy tails)."),
    target_uplift: float = typer.Option(0.02, help="Relative uplift the run should detect "
                                                   "(power statement; 0.02 = 2%)."),
    db: Path = typer.Option(None, help="DuckDB views file (default: OUT/events.duckdb)."),
    metrics_file: Path = typer.Option(None, "--metrics", help="YAML metrics file (name, kind "
                                      "mean|proportion|ratio, numerator/denominator SQL over "
                                      "the events, cap_quantile, role, margin); default: "
                                      "configs/metrics/default.yaml."),
    primary: list[str] = typer.Option(None, "--primary", help="Primary metric (repeatable): "
                                      "the confirmatory family; overrides the file's roles."),
    threads: int = typer.Option(1, "--threads", help="DuckDB threads; 1 (default) sums in one "
                                "order, so re-analysis gives byte-identical files."),
) -> None:
    """Analyse a run: SRM check, per-user metrics in DuckDB, Welch/delta/CUPED tests,
    sequential looks, power; writes the report."""
    from rich.console import Console

    from analysis.analyze import analyze
    from analysis.stats import StatsError
    from analysis.store import AnalysisError
    from quasid.core.cli import error_line

    console = Console()
    try:
        with console.status("analysing") as status:
            results = analyze(run_dir, out, alpha=alpha, control=control, db_path=db,
                              correction=correction, metrics=metric or None, bootstrap=bootstrap,
                              target_uplift=target_uplift, threads=threads,
                              metrics_file=metrics_file, primary=primary or None,
                              progress=lambda msg: status.update(msg))
    except (AnalysisError, StatsError) as exc:
        typer.echo(error_line(exc), err=True)  # the one error style: stderr, exit 2
        raise typer.Exit(2) from None
    srm = results["srm"]
    if srm["mismatch"]:
        console.print(f"[bold white on red] SAMPLE RATIO MISMATCH [/] p = {srm['p_value']:.3g}: "
                      f"observed {srm['observed_counts']} vs shares {srm['expected_shares']}; "
                      f"the results are not trustworthy")
    else:
        console.print(f"[green]SRM ok[/] (p = {srm['p_value']:.3g})")
    significant = [r for r in results["rows"] if r["segment"] == "all"
                   and r["p_adjusted"] is not None and r["p_adjusted"] < alpha]
    for r in significant:
        console.print(f"  {r['metric']} ({r['arm']}, {r['family']}): {_pct(r['rel_effect'])} "
                      f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}], "
                      f"abs {_num(r['abs_effect'])} [{_num(r['abs_ci_low'])}, "
                      f"{_num(r['abs_ci_high'])}], p_adj = {r['p_adjusted']:.3g}"
                      + (f" ({r['warning']})" if r.get("warning") else ""))
    console.print(f"wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'results.json'}")


def _pct(x: float | None) -> str:
    """A relative value as a signed percentage, `n/a` when undefined (None)."""
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def import_logs_cmd(
    events: Path = typer.Argument(..., help="Event log, Parquet or CSV: one row per event."),
    out: Path = typer.Option(..., "--out", help="Run directory to write (new or empty)."),
    unit: str = typer.Option(..., "--unit", help="Column of the unit (user) id."),
    arm: str = typer.Option(..., "--arm", help="Column of the arm (variant) name."),
    time: str = typer.Option(..., "--time", help="Column of the event time (datetime, date, "
                                                 "ISO string or integer seconds)."),
    event: str = typer.Option(..., "--event", help="Column of the event type (impression, "
                                                   "click, order, cancel, or a --metrics "
                                                   "file's)."),
    value: str = typer.Option(None, "--value", help="Column of the event's value (order "
                                                    "amount); default 0."),
    item: str = typer.Option(None, "--item", help="Column of the item id."),
    position: str = typer.Option(None, "--position", help="Column of the slate position."),
    request: str = typer.Option(None, "--request", help="Column of the request (slate) id; "
                                                        "default one per (unit, time)."),
    propensity: str = typer.Option(None, "--propensity", help="Column of the logging "
                                   "policy's probability of the shown item (for quasid ope)."),
    segment: list[str] = typer.Option(None, "--segment", help="Column to turn into a cohort "
                                      "flag (repeatable)."),
    control: str = typer.Option(None, "--control", help="Control arm (default: the first "
                                                        "arm in sorted order)."),
    shares: str = typer.Option(None, "--shares", help="Intended split for the SRM check, "
                                                      "arm=share,... (default: equal)."),
    assignments: Path = typer.Option(None, "--assignments", help="Assignments file (Parquet "
                                     "or CSV) with every unit, also those without events; "
                                     "same --unit/--arm column names."),
    assignments_unit: str = typer.Option(None, help="Unit column of --assignments if named "
                                                    "otherwise."),
    assignments_arm: str = typer.Option(None, help="Arm column of --assignments if named "
                                                   "otherwise."),
    experiment_id: str = typer.Option("imported", "--experiment-id", help="Experiment id."),
    metrics_file: Path = typer.Option(None, "--metrics", help="Metrics file whose event "
                                      "types the log may hold (default: the built-in "
                                      "metrics)."),
) -> None:
    """Turn an external A/B event log into a run directory that `quasid analyze` reads."""
    from rich.console import Console

    from analysis.logs import Mapping, import_logs
    from analysis.store import AnalysisError

    console = Console()
    mapping = Mapping(unit, arm, time, event, value, item, position, request, propensity,
                      tuple(segment or ()))
    try:
        summary = import_logs(events, out, mapping, control=control, shares=shares,
                              assignments=assignments, assignment_unit=assignments_unit,
                              assignment_arm=assignments_arm, experiment_id=experiment_id,
                              metrics_file=metrics_file)
    except AnalysisError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    console.print(f"wrote run directory {summary.run_dir}: experiment "
                  f"{summary.experiment_id!r}, {summary.events} events over {summary.days} "
                  f"day(s); units per arm {summary.units}; control {summary.control!r}; "
                  f"shares {summary.arms}")
    for note in summary.filled:
        console.print(f"  filled: {note}")


def ope_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory whose events carry the logging "
                                             "propensity (import-logs --propensity)."),
    target: Path = typer.Option(..., "--target", help="Target policy's slates for the logged "
                                "requests: Parquet or CSV with request_id, position, item_id."),
    arm: str = typer.Option(None, "--arm", help="Use only the logs of this arm (default: all)."),
    alpha: float = typer.Option(0.05, help="1 - CI level."),
    uniform: bool = typer.Option(None, "--uniform/--not-uniform", help="Logging was "
                                 "uniformly random (enables replay); default: detected from "
                                 "the propensities."),
    out: Path = typer.Option(None, "--out", help="Write the estimates as JSON here."),
) -> None:
    """Off-policy estimates of a target policy's CTR and order rate from logged propensities:
    IPS, self-normalized IPS, doubly robust, replay."""
    import json

    from rich.console import Console

    from analysis.ope import estimate_run
    from analysis.store import AnalysisError
    from quasid.core.io import write_text_atomic

    import duckdb

    console = Console()
    try:
        result = estimate_run(run_dir, target, arm=arm, alpha=alpha, uniform=uniform)
    except (AnalysisError, duckdb.Error) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for reward, rows in result["estimates"].items():
        for r in rows:
            console.print(f"{reward:>6} {r['estimator']:>6}: {r['value']:.5g} "
                          f"[{r['ci_low']:.5g}, {r['ci_high']:.5g}] (n = {r['n']})")
    if out is not None:
        write_text_atomic(json.dumps(result, indent=2) + "\n", out)
        console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add `analyze`, `import-logs` and `ope` to a typer app (the `quasid` console command)."""
    app.command("analyze")(analyze_cmd)
    app.command("import-logs")(import_logs_cmd)
    app.command("ope")(ope_cmd)

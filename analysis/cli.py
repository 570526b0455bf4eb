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
                              target_uplift=target_uplift,
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


def register(app: typer.Typer) -> None:
    """Add the `analyze` command to a typer app (the `quasid` console command)."""
    app.command("analyze")(analyze_cmd)

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
    correction: str = typer.Option("bh", help="Multiplicity correction across rows: bh or holm."),
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
    from analysis.store import AnalysisError

    console = Console()
    try:
        with console.status("analysing") as status:
            results = analyze(run_dir, out, alpha=alpha, control=control, db_path=db,
                              correction=correction, metrics=metric or None, bootstrap=bootstrap,
                              target_uplift=target_uplift,
                              progress=lambda msg: status.update(msg))
    except AnalysisError as exc:
        console.print(f"[bold red]analysis failed:[/] {exc}")
        raise typer.Exit(1) from exc
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
        console.print(f"  {r['metric']} ({r['arm']}): {100 * r['rel_effect']:+.2f}% "
                      f"[{100 * r['ci_low']:+.2f}%, {100 * r['ci_high']:+.2f}%], "
                      f"p_adj = {r['p_adjusted']:.3g}")
    console.print(f"wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'results.json'}")


def register(app: typer.Typer) -> None:
    """Add the `analyze` command to a typer app (the `quasid` console command)."""
    app.command("analyze")(analyze_cmd)

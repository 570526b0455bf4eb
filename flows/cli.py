"""The `quasid` console command: every stage of the harness under one CLI.

This module owns the root app; each package registers its own commands on it (`data`,
`train`, `eval`, `simulate`, `analyze`), and the flows add `run` and `serve`. Heavy imports
(Prefect, DuckDB, torch) happen inside each command, so `quasid --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from analysis import cli as analysis_cli
from quasid.core.cli import console
from quasid.data import cli as data_cli
from quasid.evaluation import cli as evaluation_cli
from quasid.tokenizer import cli as tokenizer_cli
from simulator import cli as simulator_cli

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="QuaSID A/B harness: data, tokenizers, SID stacks, simulated A/B tests.")
for package_cli in (data_cli, tokenizer_cli, evaluation_cli, simulator_cli, analysis_cli):
    package_cli.register(app)


@app.command("run")
def run(
    out: Path = typer.Option(Path("runs/quasid"), help="Output folder: report, results, run dir, "
                                                       "DuckDB file, data, tokenizers, stacks."),
    seed: int = typer.Option(0, help="Seed of the whole run: same seed, same results.json."),
    device: str = typer.Option("cpu", help="cpu or cuda (tokenizer and stack training)."),
    config: Path = typer.Option(None, help="Run config YAML (default: QuaSID vs RQ-VAE on the "
                                           "synthetic world, 50/50; see configs/)."),
) -> None:
    """The main job: data -> tokenizers -> SID stacks -> simulated A/B test -> report."""
    from flows.runtime import configure_prefect

    configure_prefect(log_level="INFO")
    from flows.config import load_run_config
    from flows.pipeline import ab_pipeline

    run_config = load_run_config(config, out, seed, device)
    console.print(f"[bold]quasid run[/]: {run_config.experiment.experiment_id} -> {out} "
                  f"(seed {seed}, {device}); starting Prefect (local, no server needed)")
    summary = ab_pipeline(run_config)
    console.print(f"[bold green]done[/]: report {summary['report']}\n"
                  f"      html   {summary['html']}\n      results {summary['results']}")


@app.command("serve")
def serve(
    out: Path = typer.Option(Path("runs/nightly"), help="Output folder of the scheduled runs."),
    config: Path = typer.Option(None, help="Run config YAML for the nightly pipeline."),
    retrain_cron: str = typer.Option("0 2 * * *", help="Cron of the nightly retrain + simulation."),
    analysis_cron: str = typer.Option("0 7 * * *", help="Cron of the daily analysis."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Serve the deployments on cron schedules (needs a running `prefect server`)."""
    from flows.runtime import configure_prefect

    configure_prefect()
    from flows.deployments import serve_deployments

    serve_deployments(out=out, config=config, retrain_cron=retrain_cron,
                      analysis_cron=analysis_cron, device=device)


def main() -> None:
    """Entry point of the `quasid` console script."""
    app()


if __name__ == "__main__":
    main()

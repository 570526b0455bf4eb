"""The `quasid` console command: every stage of the harness under one CLI.

This module owns the root app; each package registers its own commands on it (`data`,
`train`, `eval`, `simulate`, `analyze`), and the flows add `run` and `serve`. Heavy imports
(Prefect, DuckDB, torch) happen inside each command, so `quasid --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from analysis import cli as analysis_cli
from quasid.core.cli import console, error_line, is_input_error, one_line
from quasid.data import cli as data_cli
from quasid.evaluation import cli as evaluation_cli
from quasid.tokenizer import cli as tokenizer_cli
from simulator import cli as simulator_cli

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="QuaSID A/B harness: data, tokenizers, SID stacks, simulated A/B tests.")
for package_cli in (data_cli, tokenizer_cli, evaluation_cli, simulator_cli, analysis_cli):
    package_cli.register(app)

PACKAGE = "quasid-ab"


def version() -> str:
    """The installed package's version (importlib.metadata), or `unknown` when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"quasid {version()}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version,
                                      is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error "
                                                      "(also QUASID_DEBUG=1)."),
) -> None:
    """QuaSID A/B harness: data, tokenizers, SID stacks, simulated A/B tests.

    Bad input stops with one line on stderr, `error: <file/field>: <what> (expected
    <what>)`, and exit code 2; Ctrl-C exits 130; --debug shows tracebacks.
    """


@app.command("run")
def run(
    out: Path = typer.Option(Path("runs/quasid"), help="Output folder: report, results, run dir, "
                                                       "DuckDB file, data, tokenizers, stacks."),
    seed: int = typer.Option(0, help="Seed of the whole run: same seed, same results.json."),
    device: str = typer.Option("cpu", help="cpu or cuda (tokenizer and stack training)."),
    config: Path = typer.Option(None, help="Run config YAML (default: QuaSID vs RQ-VAE on the "
                                           "synthetic world, 50/50; see configs/)."),
) -> None:
    """The main job: data -> tokenizers -> SID stacks -> simulated A/B test -> report.

    Every check runs first (config, device, data, slate vs world, stacks: nothing is
    written on an error); then the folder is locked (one run per --out at a time) and
    staging folders a killed run left are removed; Ctrl-C stops within seconds (exit 130)
    and a rerun resumes.
    """
    from flows.runtime import configure_prefect, quiet_tracebacks, start_local_server

    configure_prefect(log_level="INFO")
    from flows.config import DEFAULT_CONFIG, load_run_config
    from flows.preflight import preflight
    from quasid.core.interrupt import stop_on_sigint
    from quasid.core.io import remove_stale_staging
    from quasid.core.lock import describe, hold

    source = str(config if config is not None else DEFAULT_CONFIG)
    run_config = load_run_config(config, out, seed, device)
    preflight(run_config, source=source)
    with hold(out, run_config.fingerprint(), "quasid run") as lock, stop_on_sigint():
        if lock.took_over:
            console.print(f"took over the lock of a run that died ({describe(lock.took_over)})")
        for path in remove_stale_staging(out):
            console.print(f"removed {path} (staging left by a killed run)")
        console.print(f"[bold]quasid run[/]: {run_config.experiment.experiment_id} -> {out} "
                      f"(seed {seed}, {device}); starting Prefect (local, no server needed)")
        # before anything imports prefect (its settings must see the server's URL); returns
        # at once: the server starts while this process imports the pipeline
        server = start_local_server()
        if not _debug():
            quiet_tracebacks()
        from flows.pipeline import ab_pipeline

        if server is not None:
            if run_config.trainings:
                # torch.optim imports torch._dynamo at its first step (~2.5 s on the 2-core
                # box): here it overlaps the server's start instead of delaying the training
                import torch._dynamo  # noqa: F401
            server.wait()
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


def _debug() -> bool:
    return os.environ.get("QUASID_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `quasid` console script: the one error style of every command.

    Bad input (the project's `ConfigError`, `ContractError`, `AnalysisError`,
    `RunDirError`, `LockError`, missing files, pydantic errors, unreadable DuckDB files):
    `error: <file/field>: <what> (expected <what>)` on stderr, exit code 2. Ctrl-C: exit
    130. Anything else: one line naming the exception, exit 1. `--debug` (anywhere on the
    command line) or `QUASID_DEBUG=1` lets the traceback through instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["QUASID_DEBUG"] = "1"
    try:
        code = app(args=args, prog_name="quasid", standalone_mode=False)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        # typer vendors its own click: its exceptions are recognised by shape, not class
        if type(exc).__name__ == "Abort":  # click's form of KeyboardInterrupt
            _interrupted()
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()  # usage errors: click's own message, exit 2
            sys.exit(exc.exit_code)
        _fail(exc)
    if code == 130:  # typer turns KeyboardInterrupt into a silent exit code 130
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> None:
    typer.echo("error: interrupted (SIGINT): finished work is kept; rerun the same command "
               "to resume", err=True)
    sys.exit(130)


def _fail(exc: Exception) -> None:
    if _debug():
        raise exc
    if is_input_error(exc):
        typer.echo(error_line(exc), err=True)
        sys.exit(2)
    typer.echo(f"error: {type(exc).__name__}: {one_line(exc)} (unexpected: rerun with "
               "--debug for the traceback)", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()

"""Scheduled deployments: the nightly retrain + simulation and the daily analysis.

`quasid serve` serves both from this process with Prefect's `serve` (cron schedules need a
running `prefect server`: `prefect server start`, then `PREFECT_API_URL` pointing at it).
Teams with work pools use `prefect.yaml` at the repository root instead (`prefect deploy`).
Both read the same run config file (default `configs/default_run.yaml`), so the schedule and
the main job run the same experiment. Each night writes its own folder `OUT/YYYY-MM-DD/`
with the seed YYYYMMDD (a new world, assignment and training every night; `data.path` may
name `{date}` for nightly exports); the daily analysis reads the newest of them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve

from flows.config import DEFAULT_CONFIG, load_run_config
from flows.pipeline import analyze_latest, scheduled_run


def deployments(out: Path, config: Path | None, retrain_cron: str, analysis_cron: str,
                device: str = "cpu") -> list:
    """The two runner deployments with their cron schedules and parameters."""
    config_path = Path(config) if config is not None else DEFAULT_CONFIG
    run_config = load_run_config(config_path, out, seed=0, device=device)  # fail now, not at 2am
    nightly = scheduled_run.to_deployment(
        name="nightly-retrain-and-simulate", cron=retrain_cron,
        parameters={"config_path": str(config_path.resolve()), "out": str(out),
                    "device": device},
        description="Each night: a dated run folder OUT/YYYY-MM-DD (seed YYYYMMDD): retrain "
                    "the arms' tokenizers and stacks, replay the window, analyse.")
    daily = analyze_latest.to_deployment(
        name="daily-analysis", cron=analysis_cron,
        parameters={"root": str(out), "alpha": run_config.pipeline.alpha,
                    "target_uplift": run_config.pipeline.target_uplift},
        description="Re-analyse the newest dated run folder (sequential looks by day).")
    return [nightly, daily]


def serve_deployments(out: Path, config: Path | None, retrain_cron: str, analysis_cron: str,
                      device: str = "cpu") -> None:
    """Serve both deployments until interrupted."""
    serve(*deployments(out, config, retrain_cron, analysis_cron, device))

"""The offline benchmark as a Prefect flow: the one runner (`quasid.evaluation.offline`)
in a task, its results published as artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from quasid.evaluation.offline import offline_eval as run_offline_eval
from quasid.evaluation.offline import results_markdown


@task(name="offline-eval-runs")
def offline_eval_task(data_dir: str, tokenizers: list[str], seeds: int, out_dir: str,
                      device: str, overrides: dict | None, tokenizer_epochs: int | None,
                      tokenizer_overrides: dict | None) -> dict:
    """Every tokenizer x seed run (finished runs with the same settings are reused)."""
    return run_offline_eval(data_dir, tokenizers, seeds, out_dir, device=device,
                            overrides=overrides, tokenizer_epochs=tokenizer_epochs,
                            tokenizer_overrides=tokenizer_overrides, progress=False)


@flow(name="offline-eval")
def offline_eval(data_dir: Path, tokenizers: list[str], out_dir: Path, seeds: int = 3,
                 device: str = "cpu", overrides: dict | None = None,
                 tokenizer_epochs: int | None = None,
                 tokenizer_overrides: dict | None = None) -> dict:
    """Leave-one-out HR/NDCG of each tokenizer's stack, mean ± std over seeds 0..seeds-1.

    A failed run is reported in `results.json`, not fatal unless all fail. Writes
    `results.json` and `results.md` to `out_dir` and publishes them as artifacts.
    """
    results = offline_eval_task(str(data_dir), tokenizers, seeds, str(out_dir), device,
                                overrides, tokenizer_epochs, tokenizer_overrides)
    for run, error in results["failed"].items():
        get_run_logger().warning("%s failed: %s", run, error)
    create_markdown_artifact(results_markdown(results), key="offline-eval-report",
                             description="Offline evaluation (leave-one-out HR/NDCG)")
    create_table_artifact(results["rows"], key="offline-eval-results",
                          description="results.json rows (stack, one per tokenizer x segment)")
    get_run_logger().info("offline evaluation: %s", Path(out_dir) / "results.md")
    return results

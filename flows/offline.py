"""Prefect flows: train tokenizers, evaluate offline, simulate the A/B test, analyse it.

The flows are thin: every task wraps a plain function of `quasid`, `simulator` or
`analysis`, passes file paths (never frames or models) and is cached on a fingerprint of
its inputs (data bytes + config), so a rerun skips finished work. When a cached step's
output has gone missing, the step runs again (`refresh_cache`).

Import `flows.runtime.configure_prefect()` before this module when Prefect has not been
configured by the environment (the CLI does).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_table_artifact,
)

from flows.tasks import eval_run_task


@flow(name="offline-eval")
def offline_eval(data_dir: Path, tokenizers: list[str], out_dir: Path, seeds: int = 3,
                 device: str = "cpu", overrides: dict | None = None,
                 tokenizer_epochs: int | None = None,
                 tokenizer_overrides: dict | None = None) -> dict:
    """Leave-one-out HR/NDCG of each tokenizer's stack, mean ± std over seeds 0..seeds-1.

    One task per tokenizer x seed (a finished run with the same settings is reused from its
    `metrics.json`); a failed run is reported in `results.json`, not fatal unless all fail.
    Writes `results.json` and `results.md` to `out_dir` and publishes them as artifacts.
    """
    from quasid.evaluation.offline import (
        eval_settings,
        eval_tasks,
        results_markdown,
        run_folder,
        write_results,
    )

    logger = get_run_logger()
    tasks = eval_tasks(tokenizers, seeds)
    settings = eval_settings(overrides, tokenizer_epochs, tokenizer_overrides)
    done, failed = {}, {}
    for tok, seed in tasks:
        state = eval_run_task(str(data_dir), tok, seed, str(run_folder(out_dir, tok, seed)),
                              device, settings["overrides"], tokenizer_epochs,
                              settings["tokenizer_overrides"], return_state=True)
        if state.is_completed():
            done[tok, seed] = json.loads(Path(state.result()).read_text())
        else:
            failed[f"{tok}/seed{seed}"] = str(state.message)
            logger.warning("%s seed %d failed: %s", tok, seed, state.message)
    results = write_results(out_dir, data_dir, tasks, done, failed, seeds, device, settings)
    create_markdown_artifact(results_markdown(results), key="offline-eval-report",
                             description="Offline evaluation (leave-one-out HR/NDCG)")
    create_table_artifact(results["rows"], key="offline-eval-results",
                          description="results.json rows (stack, one per tokenizer x segment)")
    logger.info("offline evaluation: %s", Path(out_dir) / "results.md")
    return results

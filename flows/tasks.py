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
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

DATA_FILES = "*.*"


def _cache_key(context: Any, inputs: dict[str, Any]) -> str:
    """Tasks are keyed on their name and the `fingerprint` argument the flow computed."""
    return f"{context.task.name}-{inputs['fingerprint']}"


def _run(step, done: Path, **kwargs):
    """Call a cached task; recompute (refresh the cache) when its output is missing."""
    return step.with_options(refresh_cache=not done.exists())(**kwargs)


# ---------------------------------------------------------------- tasks (plain functions inside)


@task(name="synthesize-world", cache_key_fn=_cache_key, persist_result=True)
def synthesize_task(world: dict, out_dir: str, fingerprint: str) -> str:
    """Generate the synthetic world into `out_dir` (a dataset folder)."""
    from quasid.data.synthetic import WorldConfig, synthesize

    card = synthesize(WorldConfig(**world), out_dir)
    get_run_logger().info("synthetic world: %s", json.dumps(card["counts"]))
    return out_dir


@task(name="train-tokenizer", cache_key_fn=_cache_key, persist_result=True)
def train_tokenizer_task(data_dir: str, tokenizer: str, out_dir: str, device: str, seed: int,
                         epochs: int | None, overrides: dict, fingerprint: str) -> dict:
    """Train one tokenizer; returns its SID quality metrics (files in `out_dir`)."""
    from quasid.tokenizer.train import train_tokenizer

    metrics = train_tokenizer(Path(data_dir), tokenizer, Path(out_dir), device=device,
                              epochs=epochs, seed=seed, overrides=overrides or None)
    get_run_logger().info("%s: collision rate %.4f, SID entropy %.3f", tokenizer,
                          metrics["collision_rate"], metrics["sid_entropy"])
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


@task(name="build-stack", cache_key_fn=_cache_key, persist_result=True)
def build_stack_task(data_dir: str, sids_path: str, out_dir: str, device: str, seed: int,
                     overrides: dict, fingerprint: str) -> str:
    """Train a SID stack (retriever + ranker) on one SID table; returns its folder."""
    from quasid.stack.build import build_stack

    logger = get_run_logger()
    logger.info("training the SID stack on %s (retriever, then ranker)", Path(sids_path).parent.name)
    build_stack(Path(data_dir), Path(sids_path), Path(out_dir), device=device, seed=seed,
                overrides=overrides or None, progress=True)
    summary = json.loads((Path(out_dir) / "stack.json").read_text())
    logger.info("stack %s: %s", Path(sids_path).parent.name, json.dumps(summary["timings"]))
    return out_dir


@task(name="eval-run")
def eval_run_task(data_dir: str, tokenizer: str, seed: int, run_dir: str, device: str,
                  overrides: dict, tokenizer_epochs: int | None, tokenizer_overrides: dict) -> str:
    """One offline-evaluation run (SIDs, stack, metrics); returns its metrics.json path."""
    from quasid.evaluation.offline import METRICS_FILE, eval_run

    eval_run(data_dir, tokenizer, seed, run_dir, device=device, overrides=overrides,
             tokenizer_epochs=tokenizer_epochs, tokenizer_overrides=tokenizer_overrides)
    return str(Path(run_dir) / METRICS_FILE)


@task(name="prepare-experiment", retries=2, retry_delay_seconds=1)
def prepare_task(experiment: dict, run_dir: str, n_shards: int) -> dict:
    """Write the assignments (first) and the run plan."""
    from simulator.rundir import prepare

    return prepare(experiment, run_dir, n_shards)


@task(name="simulate-shard", retries=2, retry_delay_seconds=1)
def simulate_shard_task(experiment: dict, shard: int, n_shards: int, run_dir: str) -> dict:
    """Simulate one shard of users; a finished shard is skipped, so a retry is safe."""
    from simulator.replay import run_shard

    counter = _RequestCounter(f"shard {shard + 1}/{n_shards}")
    record = run_shard(experiment, shard, n_shards, run_dir, progress=counter)
    counter.finish()
    return {"shard": shard, "files": len(record["files"])}


class _RequestCounter:
    """A `progress(n)` callback logging the requests served so far (at most every `every_s`)
    and, at `finish()`, the shard's total."""

    def __init__(self, label: str, every_s: float = 20.0):
        self.logger = get_run_logger()
        self.label, self.every_s = label, every_s
        self.n, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.logger.info("%s: %d requests served", self.label, self.n)

    def finish(self) -> None:
        """Log the total served by this call (0 when the shard had finished before)."""
        self.logger.info("%s: done, %d requests served", self.label, self.n)


@task(name="finalize-experiment", retries=2, retry_delay_seconds=1)
def finalize_task(experiment: dict, run_dir: str, n_shards: int) -> dict:
    """Write `manifest.json` from the shard records."""
    from simulator.rundir import finalize

    return finalize(experiment, run_dir, n_shards)


@task(name="analyze")
def analyze_task(run_dir: str, out_dir: str, alpha: float, control: str | None,
                 target_uplift: float, seed: int, metrics: list[str] | None,
                 threads: int | None) -> dict:
    """Per-user metrics in DuckDB, tests, report; returns `results.json`'s content."""
    from analysis.analyze import analyze

    return analyze(Path(run_dir), Path(out_dir), alpha=alpha, control=control,
                   target_uplift=target_uplift, seed=seed, metrics=metrics, threads=threads)

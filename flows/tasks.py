"""Prefect tasks: one per stage function of `quasid`, `simulator` and `analysis`.

Tasks pass file paths (never frames or models). The three training stages (world,
tokenizer, stack) are cached by `stage_cache`: the key is the task's name, its arguments
and the bytes of the files it reads, so a rerun with the same inputs skips the stage and a
changed input (data, SID table, settings, device) trains again. Each of them writes a done
record (`DONE_FILE`, its inputs) last, beside its output; the flows call a stage with
`refresh_cache=not is_done(out)`, so a deleted or half-written output is built again even
where Prefect still holds a cached result for the same inputs.
The simulation resumes on its own (its run directory keeps a plan and per-shard records)
and the analysis is cheap, so those tasks are not cached; they retry on transient I/O errors.

Import `flows.runtime.configure_prefect()` before this module when Prefect has not been
configured by the environment (the CLI does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from analysis.analyze import analyze
from quasid.core.hashing import content_digest, json_digest
from quasid.core.io import write_text_atomic
from quasid.core.layout import DATASET_FILES, DONE_FILE, SUMMARY_FILE
from quasid.data.synthetic import WorldConfig, synthesize
from quasid.stack.build import build_stack
from quasid.tokenizer.train import train_tokenizer
from simulator.replay import run_shard
from simulator.rundir import finalize, prepare

TRANSIENT = (OSError,)
"""Errors worth a retry (storage hiccups); validation errors are never retried."""


def _transient(task_, task_run, state) -> bool:
    """Retry condition: only errors that can pass by themselves."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except BaseException:  # noqa: BLE001 - anything else (validation, Ctrl-C): fail at once
        return False
    return False


def stage_cache(reads: Mapping[str, tuple[str, ...]]):
    """A `cache_key_fn` over a stage's real inputs.

    `reads`: argument -> the files it names (a folder's file names, or `()` for a single
    file) whose bytes enter the key.
    """
    def key(context: Any, inputs: dict[str, Any]) -> str:
        digests = {name: content_digest(inputs[name], files) for name, files in reads.items()}
        return json_digest(context.task.name, inputs, digests)

    return key


def is_done(out_dir: str | Path) -> bool:
    """Whether a stage's output folder holds its done record (the stage finished there)."""
    return (Path(out_dir) / DONE_FILE).is_file()


def mark_done(out_dir: str, **inputs: Any) -> None:
    """Write the stage's done record (its inputs, no clock) last, beside its output."""
    write_text_atomic(json.dumps(inputs, indent=2, sort_keys=True, default=str) + "\n",
                      Path(out_dir) / DONE_FILE)


@task(name="synthesize-world", persist_result=True,
      cache_key_fn=stage_cache({}))
def synthesize_task(world: dict, out_dir: str) -> str:
    """Generate the synthetic world into `out_dir` (a dataset folder)."""
    card = synthesize(WorldConfig(**world), out_dir)
    get_run_logger().info("synthetic world: %s", json.dumps(card["counts"]))
    mark_done(out_dir, world=world)
    return out_dir


@task(name="train-tokenizer", persist_result=True,
      cache_key_fn=stage_cache({"data_dir": DATASET_FILES}))
def train_tokenizer_task(data_dir: str, tokenizer: str, out_dir: str, device: str, seed: int,
                         epochs: int | None, overrides: dict) -> dict:
    """Train one tokenizer; returns its SID quality metrics (files in `out_dir`)."""
    metrics = train_tokenizer(Path(data_dir), tokenizer, Path(out_dir), device=device,
                              epochs=epochs, seed=seed, overrides=overrides or None)
    get_run_logger().info("%s: collision rate %.4f, SID entropy %.3f", tokenizer,
                          metrics["collision_rate"], metrics["sid_entropy"])
    mark_done(out_dir, data_dir=data_dir, tokenizer=tokenizer, device=device, seed=seed,
              epochs=epochs, overrides=overrides)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


@task(name="build-stack", persist_result=True,
      cache_key_fn=stage_cache({"data_dir": DATASET_FILES, "sids_path": ()}))
def build_stack_task(data_dir: str, sids_path: str, out_dir: str, device: str, seed: int,
                     overrides: dict) -> str:
    """Train a SID stack (retriever + ranker) on one SID table; returns its folder."""
    logger = get_run_logger()
    logger.info("training the SID stack on %s (retriever, then ranker)", Path(sids_path).parent.name)
    build_stack(Path(data_dir), Path(sids_path), Path(out_dir), device=device, seed=seed,
                overrides=overrides or None, progress=True)
    summary = json.loads((Path(out_dir) / SUMMARY_FILE).read_text())
    logger.info("stack %s: %s", Path(sids_path).parent.name, json.dumps(summary["timings"]))
    mark_done(out_dir, data_dir=data_dir, sids_path=sids_path, device=device, seed=seed,
              overrides=overrides)
    return out_dir


@task(name="prepare-experiment", retries=2, retry_delay_seconds=1,
      retry_condition_fn=_transient)
def prepare_task(experiment: dict, run_dir: str, n_shards: int) -> dict:
    """Write the assignments (first) and the run plan."""
    return prepare(experiment, run_dir, n_shards)


@task(name="simulate-shard", retries=2, retry_delay_seconds=1, retry_condition_fn=_transient)
def simulate_shard_task(experiment: dict, shard: int, n_shards: int, run_dir: str) -> dict:
    """Simulate one shard of users; a finished shard is skipped, so a retry is safe."""
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


@task(name="finalize-experiment", retries=2, retry_delay_seconds=1,
      retry_condition_fn=_transient)
def finalize_task(experiment: dict, run_dir: str, n_shards: int) -> dict:
    """Write `manifest.json` from the shard records."""
    return finalize(experiment, run_dir, n_shards)


@task(name="analyze")
def analyze_task(run_dir: str, out_dir: str, alpha: float, control: str | None,
                 target_uplift: float, seed: int, metrics: list[str] | None,
                 threads: int | None) -> dict:
    """Per-user metrics in DuckDB, tests, report; returns `results.json`'s content."""
    return analyze(Path(run_dir), Path(out_dir), alpha=alpha, control=control,
                   target_uplift=target_uplift, seed=seed, metrics=metrics, threads=threads)

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

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import SYNTHETIC, RunConfig
from flows.fingerprint import config_fingerprint, folder_fingerprint

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
    from quasid.training import train_tokenizer

    metrics = train_tokenizer(Path(data_dir), tokenizer, Path(out_dir), device=device,
                              epochs=epochs, seed=seed, overrides=overrides or None)
    get_run_logger().info("%s: collision rate %.4f, SID entropy %.3f", tokenizer,
                          metrics["collision_rate"], metrics["sid_entropy"])
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


@task(name="build-stack", cache_key_fn=_cache_key, persist_result=True)
def build_stack_task(data_dir: str, sids_path: str, out_dir: str, device: str, seed: int,
                     overrides: dict, fingerprint: str) -> str:
    """Train a SID stack (retriever + ranker) on one SID table; returns its folder."""
    from quasid.stack import build_stack

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
    from quasid.evaluate import METRICS_FILE, eval_run

    eval_run(data_dir, tokenizer, seed, run_dir, device=device, overrides=overrides,
             tokenizer_epochs=tokenizer_epochs, tokenizer_overrides=tokenizer_overrides)
    return str(Path(run_dir) / METRICS_FILE)


@task(name="prepare-experiment", retries=2, retry_delay_seconds=1)
def prepare_task(experiment: dict, run_dir: str, n_shards: int) -> dict:
    """Write the assignments (first) and the run plan."""
    from simulator.engine import prepare

    return prepare(experiment, run_dir, n_shards)


@task(name="simulate-shard", retries=2, retry_delay_seconds=1)
def simulate_shard_task(experiment: dict, shard: int, n_shards: int, run_dir: str) -> dict:
    """Simulate one shard of users; a finished shard is skipped, so a retry is safe."""
    from simulator.engine import run_shard

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
    from simulator.engine import finalize

    return finalize(experiment, run_dir, n_shards)


@task(name="analyze")
def analyze_task(run_dir: str, out_dir: str, alpha: float, control: str | None,
                 target_uplift: float, seed: int, metrics: list[str] | None,
                 threads: int | None) -> dict:
    """Per-user metrics in DuckDB, tests, report; returns `results.json`'s content."""
    from analysis.engine import analyze

    return analyze(Path(run_dir), Path(out_dir), alpha=alpha, control=control,
                   target_uplift=target_uplift, seed=seed, metrics=metrics, threads=threads)


# ---------------------------------------------------------------- flows


@flow(name="train-tokenizers")
def train_tokenizers(data_dir: Path, tokenizers: list[str], out_root: Path, device: str = "cpu",
                     seed: int = 0, epochs: int | None = None,
                     overrides: dict[str, dict] | None = None) -> dict[str, str]:
    """Train each tokenizer (cached on data + config); returns `{tokenizer: output folder}`."""
    data_fp = folder_fingerprint(data_dir, DATA_FILES)
    outputs = {}
    for name in dict.fromkeys(tokenizers):
        out = Path(out_root) / name
        over = (overrides or {}).get(name, {})
        fp = config_fingerprint(data_fp, name, seed, epochs, over, str(out))
        _run(train_tokenizer_task, out / "sids.parquet", data_dir=str(data_dir), tokenizer=name,
             out_dir=str(out), device=device, seed=seed, epochs=epochs, overrides=over,
             fingerprint=fp)
        outputs[name] = str(out)
    return outputs


@flow(name="build-stacks")
def build_stacks(data_dir: Path, sid_dirs: dict[str, str], out_root: Path, device: str = "cpu",
                 seed: int = 0, overrides: dict | None = None) -> dict[str, str]:
    """Build one SID stack per tokenizer output (cached); returns `{tokenizer: stack folder}`."""
    data_fp = folder_fingerprint(data_dir, DATA_FILES)
    stacks = {}
    for name, sid_dir in sid_dirs.items():
        sids = Path(sid_dir) / "sids.parquet"
        out = Path(out_root) / name
        fp = config_fingerprint(data_fp, folder_fingerprint(sid_dir, "sids.parquet"), seed,
                                overrides or {}, str(out))
        _run(build_stack_task, out / "stack.pt", data_dir=str(data_dir), sids_path=str(sids),
             out_dir=str(out), device=device, seed=seed, overrides=overrides or {},
             fingerprint=fp)
        stacks[name] = str(out)
    return stacks


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
    from quasid.evaluate import (eval_settings, eval_tasks, results_markdown, run_folder,
                                 write_results)

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


@flow(name="simulate-ab")
def simulate_ab(experiment: dict, run_dir: Path, n_shards: int = 2) -> dict:
    """Replay the experiment window through each arm's stack, shard by shard; the manifest.

    Shards run through the flow's task runner (threads by default; a Dask cluster with
    `simulate_ab.with_options(task_runner=DaskTaskRunner(...))`). Their events do not
    depend on the number of shards or where they ran.
    """
    prepare_task(experiment, str(run_dir), n_shards)
    futures = simulate_shard_task.map(unmapped(experiment), list(range(n_shards)),
                                      unmapped(n_shards), unmapped(str(run_dir)))
    futures.wait()
    for future in futures:
        future.result()  # raise the first failure
    manifest = finalize_task(experiment, str(run_dir), n_shards)
    get_run_logger().info("simulated %s: %s", manifest["experiment_id"],
                          json.dumps(manifest["counts"]["users"]))
    return manifest


@flow(name="analyze-experiment")
def analyze_experiment(run_dir: Path, out_dir: Path, alpha: float = 0.05,
                       control: str | None = None, target_uplift: float = 0.02,
                       seed: int = 0, metrics: list[str] | None = None,
                       threads: int | None = 1) -> dict:
    """Analyse a run directory and publish the report as Prefect artifacts."""
    results = analyze_task(str(run_dir), str(out_dir), alpha, control, target_uplift, seed,
                           metrics, threads)
    publish_artifacts(Path(out_dir), results)
    return results


def publish_artifacts(out_dir: Path, results: dict) -> None:
    """The report as a markdown artifact, the results as a table, links to HTML and plots."""
    report = (out_dir / "report.md").read_text()
    create_markdown_artifact(report, key="ab-report", description="A/B test report")
    create_table_artifact(results["rows"], key="ab-results",
                          description="results.json rows (one per metric, segment, arm)")
    create_link_artifact(f"file://{(out_dir / 'report.html').resolve()}", link_text="report.html",
                         key="ab-report-html", description="Self-contained HTML report")
    for plot in sorted((out_dir / "plots").glob("*.png")):
        key = "plot-" + "".join(c if c.isalnum() else "-" for c in plot.stem.lower())
        create_link_artifact(f"file://{plot.resolve()}", link_text=plot.name, key=key)


def _task_runner(config: RunConfig):
    options = config.pipeline
    if options.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if options.dask_address:
            return DaskTaskRunner(address=options.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": options.dask_workers,
                                              "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=options.n_shards)


@flow(name="ab-pipeline")
def ab_pipeline(config: RunConfig) -> dict:
    """Data → one tokenizer per arm → SID stacks → simulated A/B test → analysis → report."""
    logger = get_run_logger()
    out = Path(config.out).resolve()
    options = config.pipeline
    data_path = Path(config.experiment["data"]["path"])
    if str(data_path) == SYNTHETIC:
        world = {**options.synthetic, "seed": config.seed}
        data_path = out / "data"
        _run(synthesize_task, data_path / "items.parquet", world=world, out_dir=str(data_path),
             fingerprint=config_fingerprint(world, str(data_path)))
    logger.info("data: %s", data_path)

    arm_tokenizers = config.tokenizers
    sid_dirs = train_tokenizers(data_path, list(arm_tokenizers.values()), out / "tokenizers",
                                device=config.device, seed=config.seed,
                                epochs=options.tokenizer_epochs,
                                overrides=options.tokenizer_overrides)
    stack_dirs = build_stacks(data_path, sid_dirs, out / "stacks", device=config.device,
                              seed=config.seed, overrides=options.stack_overrides)
    stacks = {arm: stack_dirs[tok] for arm, tok in arm_tokenizers.items()}
    experiment = config.experiment_config(data_path=data_path, stacks=stacks)
    run_dir = out / "run"
    manifest = simulate_ab.with_options(task_runner=_task_runner(config))(
        experiment.model_dump(mode="json"), run_dir, options.n_shards)
    results = analyze_experiment(run_dir, out, alpha=options.alpha,
                                 control=manifest["control"],
                                 target_uplift=options.target_uplift, seed=config.seed,
                                 metrics=options.metrics, threads=options.analysis_threads)
    logger.info("report: %s", out / "report.html")
    return {"out": str(out), "report": str(out / "report.md"), "html": str(out / "report.html"),
            "results": str(out / "results.json"), "run_dir": str(run_dir),
            "tokenizers": sid_dirs, "stacks": stack_dirs, "n_rows": len(results["rows"])}


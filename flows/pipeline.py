"""Prefect flows of the A/B pipeline: data, tokenizers, SID stacks, simulation, analysis.

`ab_pipeline(config)` is the main job (`quasid run`); its parts are flows of their own so
they can run alone: `train_tokenizers`, `build_stacks`, `simulate_ab` (shards through the
flow's task runner: threads, or Dask) and `analyze_experiment` (the report as artifacts).
`scheduled_run` is what the nightly deployment calls: a run config file in, a dated run
folder out (`OUT/YYYY-MM-DD/`, seed YYYYMMDD); `analyze_latest` is the daily analysis of
the newest one.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import SYNTHETIC, RunConfig, load_run_config
from flows.preflight import preflight
from flows.tasks import (
    analyze_task,
    build_stack_task,
    finalize_task,
    is_done,
    prepare_task,
    simulate_shard_task,
    synthesize_task,
    train_tokenizer_task,
)
from quasid.core.config import parse
from quasid.core.io import remove_stale_staging
from quasid.core.layout import MANIFEST_FILE, SIDS_FILE
from quasid.core.lock import hold


def training_name(tokenizer: str, seed: int) -> str:
    """The folder (under tokenizers/ and stacks/) of one training: `<tokenizer>/seed<seed>`."""
    return f"{tokenizer}/seed{seed}"


@flow(name="train-tokenizers")
def train_tokenizers(data_dir: Path, trainings: list[tuple[str, int]], out_root: Path,
                     device: str = "cpu", epochs: int | None = None,
                     overrides: dict[str, dict] | None = None) -> dict[str, str]:
    """Train each (tokenizer, seed) once (cached on data + settings); returns
    `{training_name: output folder}`."""
    outputs = {}
    for name, seed in dict.fromkeys(tuple(t) for t in trainings):
        out = Path(out_root) / training_name(name, seed)
        train_tokenizer_task.with_options(refresh_cache=not is_done(out))(
            data_dir=str(data_dir), tokenizer=name, out_dir=str(out), device=device, seed=seed,
            epochs=epochs, overrides=(overrides or {}).get(name, {}))
        outputs[training_name(name, seed)] = str(out)
    return outputs


@flow(name="build-stacks")
def build_stacks(data_dir: Path, sid_dirs: dict[str, str], out_root: Path, device: str = "cpu",
                 overrides: dict | None = None) -> dict[str, str]:
    """Build one SID stack per tokenizer output, with the tokenizer's training seed (cached);
    returns `{training_name: stack folder}`."""
    stacks = {}
    for name, sid_dir in sid_dirs.items():
        out = Path(out_root) / name
        seed = int(name.rsplit("/seed", 1)[1])
        build_stack_task.with_options(refresh_cache=not is_done(out))(
            data_dir=str(data_dir), sids_path=str(Path(sid_dir) / SIDS_FILE), out_dir=str(out),
            device=device, seed=seed, overrides=overrides or {})
        stacks[name] = str(out)
    return stacks


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
        from prefect_dask import (
            DaskTaskRunner,  # optional extra: `pip install -e ".[dask]"`
        )

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
    data_path = Path(config.experiment.data.path)
    if str(data_path) == SYNTHETIC:
        data_path = out / "data"
        synthesize_task.with_options(refresh_cache=not is_done(data_path))(
            world={**options.synthetic, "seed": config.seed}, out_dir=str(data_path))
    logger.info("data: %s", data_path)

    trainings = config.trainings
    sid_dirs = train_tokenizers(data_path, [t for runs in trainings.values() for t in runs],
                                out / "tokenizers", device=config.device,
                                epochs=options.tokenizer_epochs,
                                overrides=options.tokenizer_overrides)
    stack_dirs = build_stacks(data_path, sid_dirs, out / "stacks", device=config.device,
                              overrides=options.stack_overrides)
    stacks = {arm: [stack_dirs[training_name(tok, s)] for tok, s in runs]
              for arm, runs in trainings.items()}
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


def night_of(date: str | dt.date | None = None) -> dt.date:
    """The night a scheduled run stands for: `date` (YYYY-MM-DD) or today in UTC."""
    if date is None:
        return dt.datetime.now(dt.timezone.utc).date()
    if isinstance(date, dt.date):
        return date
    try:
        return dt.date.fromisoformat(str(date))
    except ValueError:
        raise ValueError(f"date: {date!r} is not a date (expected YYYY-MM-DD)") from None


def nightly_seed(night: dt.date) -> int:
    """The seed of a night's run: its date as the integer YYYYMMDD (2026-12-01 -> 20261201)."""
    return int(night.strftime("%Y%m%d"))


@flow(name="scheduled-run")
def scheduled_run(config_path: str, out: str, seed: int | None = None, device: str = "cpu",
                  date: str | None = None) -> dict:
    """The nightly deployment's flow: one dated run folder per night, trained afresh.

    The run goes to `OUT/<YYYY-MM-DD>/` (the night's date, today in UTC unless `date` is
    given) with the seed `YYYYMMDD` of that date (`seed` overrides it), so every night
    trains new tokenizers and stacks instead of hitting the cache of the night before. The
    data is read as of that night: `data.path` may hold `{date}` (e.g.
    `exports/{date}/beauty`), filled with the night's date; the synthetic world is
    generated with the night's seed. `analyze_latest(OUT)` analyses the newest folder.
    """
    night = night_of(date)
    run_seed = nightly_seed(night) if seed is None else seed
    config = load_run_config(Path(config_path), Path(out) / night.isoformat(), run_seed, device)
    data_path = str(config.experiment.data.path)
    if "{date}" in data_path:
        experiment = config.experiment.model_dump(mode="json")
        experiment["data"]["path"] = data_path.replace("{date}", night.isoformat())
        config = parse(RunConfig, {**config.model_dump(mode="json"), "experiment": experiment},
                       config_path)
    preflight(config, source=config_path)
    get_run_logger().info("night %s: seed %d -> %s", night, run_seed, config.out)
    with hold(config.out, config.fingerprint(), "scheduled-run"):
        remove_stale_staging(config.out)
        return ab_pipeline(config)


def latest_run(root: str | Path) -> Path:
    """The newest dated run folder under `root` (`YYYY-MM-DD/` holding `run/manifest.json`)."""
    root = Path(root)
    dated = []
    for child in root.iterdir() if root.is_dir() else ():
        try:
            night = dt.date.fromisoformat(child.name)
        except ValueError:
            continue
        if (child / "run" / MANIFEST_FILE).is_file():
            dated.append((night, child))
    if not dated:
        raise FileNotFoundError(f"{root}: no dated run folder (expected YYYY-MM-DD/run/"
                                f"{MANIFEST_FILE}, written by scheduled_run)")
    return max(dated)[1]


@flow(name="analyze-latest")
def analyze_latest(root: str, alpha: float = 0.05, target_uplift: float = 0.02,
                   threads: int | None = 1) -> dict:
    """The daily analysis deployment: re-analyse the newest night's run folder in place."""
    folder = latest_run(root)
    get_run_logger().info("analysing the newest run: %s", folder)
    manifest = json.loads((folder / "run" / MANIFEST_FILE).read_text())
    results = analyze_experiment(folder / "run", folder, alpha=alpha,
                                 control=manifest["control"], target_uplift=target_uplift,
                                 seed=int(manifest.get("seed", 0)), threads=threads)
    return {"folder": str(folder), "n_rows": len(results["rows"])}

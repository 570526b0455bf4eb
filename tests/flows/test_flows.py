"""The Prefect flows on tiny data, under one session-scoped `prefect_test_harness`.

- the whole pipeline writes the report, results, run directory and DuckDB file;
- a second run hits the cache: no tokenizer or stack is trained again;
- the pipeline's results.json equals the one from running the steps by hand, same seed;
- a shard task that fails once is retried and the run completes;
- shards on a local Dask cluster (2 worker processes) give the same events and results as a
  local run;
- the offline evaluation flow aggregates its runs, publishes artifacts and reuses finished runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest

from flows.config import RunConfig

pytestmark = pytest.mark.slow  # a Prefect server and tiny trainings: minutes

TINY_WORLD = dict(n_items=300, n_users=1_500, content_dim=16, taste_dim=8, mean_interactions=8.0)
TOKENIZER = {"hidden": [32], "latent": 8, "codebook_size": 16}
STACK = {"retriever": {"epochs": 1, "d_model": 32, "n_layers": 1, "d_ff": 64},
         "ranker": {"epochs": 1, "d_model": 16}}
# tiny stacks trained for one epoch rarely show cold items, so the cold-item metric can be
# all zeros; the other metrics are what these tests compare
METRICS = ["gmv_per_user", "completed_orders_per_user", "buyer_rate", "ctr", "conversion"]


def _run_config(out: Path, seed: int = 0) -> RunConfig:
    return RunConfig(
        out=out, seed=seed,
        pipeline={"synthetic": TINY_WORLD, "tokenizer_epochs": 2,
                  "tokenizer_overrides": {"rqvae": TOKENIZER, "quasid": TOKENIZER},
                  "stack_overrides": STACK, "n_shards": 2, "metrics": METRICS},
        experiment={"experiment_id": "tiny", "data": {"path": "synthetic"},
                    "arms": [{"name": "control", "tokenizer": "rqvae", "allocation": 0.5},
                             {"name": "treatment", "tokenizer": "quasid", "allocation": 0.5}],
                    "days": 10, "pre_days": 3, "slate_size": 10},
    )


def events_digest(run_dir: Path) -> str:
    """sha256 of all events, sorted on their unique key (independent of file layout)."""
    events = pl.read_parquet(run_dir / "events" / "**" / "*.parquet", hive_partitioning=False)
    keys = ["experiment_id", "request_id", "item_id", "event_type"]
    frame = events.select(sorted(events.columns)).sort(keys)
    return hashlib.sha256(frame.write_csv().encode()).hexdigest()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def pipeline_run(harness, tmp_path_factory):
    from flows.pipeline import ab_pipeline

    out = tmp_path_factory.mktemp("pipeline")
    summary = ab_pipeline(_run_config(out))
    return out, summary


def test_pipeline_writes_report_results_run_dir_and_duckdb(pipeline_run):
    out, summary = pipeline_run
    for name in ("report.md", "report.html", "results.json", "events.duckdb",
                 "run/assignments.parquet", "run/manifest.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert {r["metric"] for r in results["rows"]} == set(METRICS)
    assert {r["arm"] for r in results["rows"]} == {"treatment"}
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    assert manifest["config"]["arms"][0]["stack"] == summary["stacks"]["rqvae/seed0"]
    assert set(json.loads((out / "tokenizers" / "quasid" / "seed0" / "metrics.json").read_text())) >= {
        "collision_rate", "unique_sids", "sid_entropy", "codebook_utilization"}


def test_second_run_hits_the_cache(pipeline_run):
    from flows.pipeline import ab_pipeline

    out, _ = pipeline_run
    trained = sorted((out / "tokenizers").rglob("*.pt")) + sorted((out / "stacks").rglob("*.pt"))
    assert len(trained) >= 4
    before = {p: p.stat().st_mtime_ns for p in trained}
    results = (out / "results.json").read_text()
    ab_pipeline(_run_config(out))
    assert {p: p.stat().st_mtime_ns for p in trained} == before  # nothing retrained
    assert (out / "results.json").read_text() == results


def test_pipeline_equals_the_steps_run_by_hand(pipeline_run, tmp_path):
    """Same seed: the steps as plain functions give the pipeline's results.json exactly."""
    from analysis.analyze import analyze
    from quasid.data.synthetic import WorldConfig, synthesize
    from quasid.stack.build import build_stack
    from quasid.tokenizer.train import train_tokenizer
    from simulator.replay import run_experiment

    out, _ = pipeline_run
    config = _run_config(tmp_path)
    data = tmp_path / "data"
    synthesize(WorldConfig(**TINY_WORLD, seed=0), data)
    stacks = {}
    for arm, tok in config.tokenizers.items():
        train_tokenizer(data, tok, tmp_path / "tok" / tok, epochs=2, seed=0, overrides=TOKENIZER)
        build_stack(data, tmp_path / "tok" / tok / "sids.parquet", tmp_path / "stack" / tok,
                    seed=0, overrides=STACK)
        stacks[arm] = [str(tmp_path / "stack" / tok)]
    experiment = config.experiment_config(data_path=data, stacks=stacks)
    # one shard where the pipeline used two: neither the events nor the results depend on it
    run_experiment(experiment, tmp_path / "run", n_shards=1)
    for tok in config.tokenizers.values():
        assert pl.read_parquet(tmp_path / "tok" / tok / "sids.parquet").equals(
            pl.read_parquet(out / "tokenizers" / tok / "seed0" / "sids.parquet")), tok
    assert events_digest(tmp_path / "run") == events_digest(out / "run")
    by_hand = json.loads(json.dumps(analyze(tmp_path / "run", tmp_path / "report",
                                            metrics=METRICS, threads=1)))
    piped = json.loads((out / "results.json").read_text())
    assert by_hand["srm"] == piped["srm"]
    differ = [(a["metric"], a["segment"], k, a[k], b[k]) for a, b in zip(by_hand["rows"],
              piped["rows"]) for k in a if a[k] != b[k]]
    assert not differ, differ[:5]
    assert len(by_hand["rows"]) == len(piped["rows"])


def test_offline_eval_flow_aggregates_its_runs_and_reuses_them(pipeline_run, tmp_path):
    from prefect.artifacts import Artifact

    from flows.offline import offline_eval

    out, _ = pipeline_run
    data, eval_dir = out / "data", tmp_path / "eval"
    kwargs = dict(seeds=2, overrides=STACK | {"weight_grid": [0.0, 1.0], "cold_bias_grid": [0.0, 1.0]},
                  tokenizer_epochs=2,
                  tokenizer_overrides=TOKENIZER)
    results = offline_eval(data, ["rqvae", "quasid"], eval_dir, **kwargs)
    written = json.loads((eval_dir / "results.json").read_text())
    assert written["rows"] == results["rows"] and written["failed"] == {}
    assert [(r["tokenizer"], r["segment"], r["seeds"]) for r in written["rows"]] == [
        ("rqvae", "all", 2), ("rqvae", "cold", 2), ("quasid", "all", 2), ("quasid", "cold", 2)]
    metrics = {(tok, s): eval_dir / "runs" / tok / f"seed{s}" / "metrics.json"
               for tok in ("rqvae", "quasid") for s in range(2)}
    runs = {key: json.loads(path.read_text()) for key, path in metrics.items()}
    for row in written["rows"]:
        values = [runs[row["tokenizer"], s]["stack"][row["segment"]]["hr@10"] for s in range(2)]
        assert row["hr@10"] == pytest.approx(sum(values) / 2)
        assert row["hr@10_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert 0 <= row["ndcg@10"] <= row["hr@10"] <= 1
    # seed 0 trains the pipeline's tokenizer (same data, epochs, overrides and seed) ...
    seed0 = eval_dir / "runs" / "quasid" / "seed0" / "tokenizer" / "sids.parquet"
    assert pl.read_parquet(seed0).equals(pl.read_parquet(out / "tokenizers" / "quasid"
                                                         / "seed0" / "sids.parquet"))
    # ... and seed 1 another one
    assert not pl.read_parquet(seed0).equals(pl.read_parquet(
        eval_dir / "runs" / "quasid" / "seed1" / "tokenizer" / "sids.parquet"))
    artifact = Artifact.get("offline-eval-results")
    assert artifact is not None and "quasid" in str(artifact.data)
    # a second call reuses every finished run
    before = {key: path.stat().st_mtime_ns for key, path in metrics.items()}
    again = offline_eval(data, ["rqvae", "quasid"], eval_dir, **kwargs)
    assert {key: path.stat().st_mtime_ns for key, path in metrics.items()} == before
    assert again["rows"] == results["rows"]
    # a run that fails is reported, the others still aggregated
    mixed = offline_eval(data, ["rqvae", "no-such-tokenizer"], eval_dir, **kwargs)
    assert sorted(mixed["failed"]) == ["no-such-tokenizer/seed0", "no-such-tokenizer/seed1"]
    assert "no-such-tokenizer" in mixed["failed"]["no-such-tokenizer/seed0"]
    assert mixed["rows"] == results["rows"][:2]


@pytest.fixture(scope="module")
def popularity_experiment(harness, small_world_dir) -> dict:
    return {"experiment_id": "flows_pop", "data": {"path": str(small_world_dir)},
            "arms": [{"name": "control", "stack": "popularity", "allocation": 0.5},
                     {"name": "treatment", "stack": "random", "allocation": 0.5}],
            "days": 4, "pre_days": 2, "slate_size": 10}


def test_a_shard_that_fails_once_is_retried(popularity_experiment, tmp_path, monkeypatch):
    import flows.tasks as engine
    from flows.pipeline import simulate_ab

    real, calls = engine.run_shard, []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError("transient storage error")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_shard", flaky)
    manifest = simulate_ab(popularity_experiment, tmp_path / "run", n_shards=2)
    # one shard failed once and ran again, the other ran once
    assert len(calls) == 3 and sorted(set(calls)) == [0, 1]
    assert manifest["counts"]["experiment"]["control"]["requests"] > 0


def test_dask_cluster_gives_the_local_events_and_results(popularity_experiment, tmp_path):
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    from analysis.analyze import analyze
    from flows.pipeline import simulate_ab
    from simulator.replay import run_experiment

    run_experiment(popularity_experiment, tmp_path / "local", n_shards=1)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                            "processes": True, "dashboard_address": None})
    simulate_ab.with_options(task_runner=runner)(popularity_experiment, tmp_path / "dask",
                                                  n_shards=4)
    assert events_digest(tmp_path / "dask") == events_digest(tmp_path / "local")
    results = [analyze(tmp_path / run, tmp_path / f"report-{run}", threads=1)["rows"]
               for run in ("local", "dask")]
    assert json.dumps(results[0]) == json.dumps(results[1])


def test_a_validation_error_in_a_shard_is_not_retried(popularity_experiment, tmp_path,
                                                      monkeypatch):
    import flows.tasks as engine
    from flows.pipeline import simulate_ab

    calls = []

    def invalid(*args, **kwargs):
        calls.append(args[1])
        raise ValueError("a deterministic input error")

    monkeypatch.setattr(engine, "run_shard", invalid)
    with pytest.raises(ValueError, match="deterministic"):
        simulate_ab(popularity_experiment, tmp_path / "run", n_shards=1)
    assert calls == [0]  # once: Prefect retries OSError only

"""The analysis on a real (small) simulator run: the contract between the two holds."""

from __future__ import annotations

import polars as pl
import pytest

from analysis.engine import AnalysisConfig, analyze_run
from tests.analysis import reference as ref


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    config = pytest.importorskip("simulator.config")
    engine = pytest.importorskip("simulator.replay")
    from quasid.data.synthetic import WorldConfig, synthesize

    base = tmp_path_factory.mktemp("sim")
    synthesize(WorldConfig(n_items=300, n_users=800, content_dim=8, taste_dim=4, seed=4),
               base / "world")
    cfg = config.parse_config({
        "experiment_id": "sim_ab", "data": {"path": str(base / "world")}, "days": 3,
        "pre_days": 2, "slate_size": 5,
        "arms": [{"name": "control", "stack": "popularity", "allocation": 0.5},
                 {"name": "treatment", "stack": "random", "allocation": 0.5}],
        "cohorts": [{"name": "premium", "level": "item", "expr": "price > 40"},
                    {"name": "heavy", "level": "user", "expr": "n_history > 8"}]})
    engine.run_experiment(cfg, base / "run")
    return base / "run"


def test_simulator_run_analyses_and_matches_raw_events(sim_run, tmp_path):
    analysis = analyze_run(sim_run, tmp_path / "a.duckdb", AnalysisConfig())
    segments = {s["name"]: s["level"] for s in analysis.details["segments"]}
    assert segments["cohort_heavy"] == "user" and segments["cohort_premium"] == "event"
    assert analysis.details["pre_period"]
    frame = ref.per_user(sim_run, "sim_ab")
    rows = {r["metric"]: r for r in analysis.results["rows"] if r["segment"] == "all"}
    for metric in ("gmv_per_user", "completed_orders_per_user"):
        yc, _ = ref.values(frame, metric, "control")
        yt, _ = ref.values(frame, metric, "treatment")
        assert rows[metric]["control_mean"] == pytest.approx(yc.mean(), rel=1e-9)
        assert rows[metric]["treatment_mean"] == pytest.approx(yt.mean(), rel=1e-9)
    counts = dict(pl.read_parquet(sim_run / "assignments.parquet")["arm"].value_counts()
                  .iter_rows())
    assert analysis.results["srm"]["observed_counts"] == counts


def test_results_do_not_depend_on_the_shard_count(small_world_dir, tmp_path):
    """The same experiment written by 1 and by 3 shards: identical results, bit for bit
    (per-day float sums once followed the file layout and differed in their last bits)."""
    from simulator.replay import run_experiment

    experiment = {"experiment_id": "shards", "data": {"path": str(small_world_dir)},
                  "arms": [{"name": "control", "stack": "popularity", "allocation": 0.5},
                           {"name": "treatment", "stack": "random", "allocation": 0.5}],
                  "days": 4, "pre_days": 2, "slate_size": 10}
    results = []
    for n_shards in (1, 3):
        run_experiment(experiment, tmp_path / f"run{n_shards}", n_shards=n_shards)
        results.append(analyze_run(tmp_path / f"run{n_shards}", tmp_path / f"{n_shards}.duckdb",
                                   AnalysisConfig(threads=1)).results)
    one, three = results
    assert len(one["rows"]) == len(three["rows"]) > 0
    assert any(r["segment"].startswith("day=") for r in one["rows"])
    differ = [(a["metric"], a["segment"], key) for a, b in zip(one["rows"], three["rows"])
              for key in a if a[key] != b[key] and a[key] == a[key]]  # NaN != NaN
    assert not differ, differ[:5]


def _copy(sim_run, tmp_path):
    import shutil
    return shutil.copytree(sim_run, tmp_path / "run")


def test_a_missing_shard_record_is_an_error(sim_run, tmp_path):
    from analysis.store import AnalysisError
    run = _copy(sim_run, tmp_path)
    record = sorted((run / "_simulator" / "shards").glob("*.json"))[0]
    record.unlink()
    with pytest.raises(AnalysisError, match=r"shard record\(s\) \['_simulator/shards/"
                                            + record.name + r"'\] missing"):
        analyze_run(run, tmp_path / "a.duckdb", AnalysisConfig())


def test_a_stray_and_a_missing_events_file_are_errors(sim_run, tmp_path):
    import shutil

    from analysis.store import AnalysisError
    run = _copy(sim_run, tmp_path)
    files = sorted((run / "events").rglob("*.parquet"))
    shutil.copy(files[0], files[0].with_name("copy.parquet"))
    with pytest.raises(AnalysisError, match=r"disagree with the shard records.*1 file\(s\) not "
                                            r"listed there: \['events/.*/copy.parquet'\]"):
        analyze_run(run, tmp_path / "a.duckdb", AnalysisConfig())
    files[0].with_name("copy.parquet").unlink()
    files[-1].unlink()
    with pytest.raises(AnalysisError, match=r"1 listed file\(s\) missing"):
        analyze_run(run, tmp_path / "b.duckdb", AnalysisConfig())

"""The analysis on a real (small) simulator run: the contract between the two holds."""

from __future__ import annotations

import polars as pl
import pytest

from analysis.engine import AnalysisConfig, analyze_run
from tests.analysis import reference as ref


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    config = pytest.importorskip("simulator.config")
    engine = pytest.importorskip("simulator.engine")
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

"""The DuckDB path end to end: views, per-user SQL aggregation, segments, tests.

Reference numbers come from the raw event rows (polars, `reference.py`) and scipy /
statsmodels; the analysis must agree with them to floating-point precision.
"""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm
from scipy import stats as sps

from analysis.engine import AnalysisConfig, analyze_run
from analysis.fake_events import FakeRunConfig, write_fake_run
from analysis.metrics import REGISTRY, Metric, register
from analysis.store import build_store, connect
from tests.analysis import reference as ref


def _rows(analysis, segment):
    return {r["metric"]: r for r in analysis.results["rows"] if r["segment"] == segment}


def test_store_holds_views_only_and_rebuilds_idempotently(run_no_pre, tmp_path):
    db = tmp_path / "store.duckdb"
    first = build_store(run_no_pre, db)
    second = build_store(run_no_pre, db)
    assert first == second
    with connect(db, read_only=True) as con:
        kinds = con.execute("SELECT table_name, table_type FROM information_schema.tables "
                            "ORDER BY table_name").fetchall()
        n_units = con.execute("SELECT count(*) FROM units").fetchone()[0]
        active = con.execute("SELECT count(DISTINCT user_id) FROM exp_events").fetchone()[0]
    assert {k for _, k in kinds} == {"VIEW"}
    assert [n for n, _ in kinds] == ["assignments", "events", "exp_events", "pre_events", "units"]
    assert n_units == 1_500 and active < n_units  # idle users exist and still count
    assert db.stat().st_size < 2_000_000
    assert [s.name for s in first.segments] == ["all", "cold_user", "cohort_vip", "cold_item",
                                                "cohort_mobile"]
    assert not first.has_pre_period


SEGMENTS = {
    "all": (None, None),
    "cold_user": ("is_cold_user", None),
    "cohort_vip": ("cohort_vip", None),
    "cold_item": (None, pl.col("is_cold_item")),
    "cohort_mobile": (None, pl.col("cohort_mobile")),
    "day=0": (None, pl.col("day") == 0),
    "day=3": (None, pl.col("day") == 3),
}


@pytest.fixture(scope="module")
def no_pre_analysis(run_no_pre, tmp_path_factory):
    return analyze_run(run_no_pre, tmp_path_factory.mktemp("db") / "a.duckdb")


@pytest.mark.parametrize("segment", list(SEGMENTS))
def test_rows_equal_reference_tests_on_raw_per_user_values(run_no_pre, no_pre_analysis, segment):
    user_flag, event_filter = SEGMENTS[segment]
    frame = ref.per_user(run_no_pre, "fake", event_filter)
    if user_flag:
        frame = frame.filter(pl.col(user_flag))
    if segment.startswith("day="):  # a day's rows: the units active that day (its own n)
        active = ref.events(run_no_pre, "fake").filter(event_filter)["user_id"].unique()
        frame = frame.filter(pl.col("user_id").is_in(active.implode()))
    rows = _rows(no_pre_analysis, segment)
    expected = set(ref.METRICS)
    if segment == "cold_item":  # the same tests as the cold-item metrics on all users: once
        expected -= {"completed_orders_per_user", "cold_item_completed_orders_per_user"}
    assert set(rows) == expected
    for metric, (_, _, kind) in ref.METRICS.items():
        if metric not in expected:
            continue
        row = rows[metric]
        yc, xc = ref.values(frame, metric, "control")
        yt, xt = ref.values(frame, metric, "treatment")
        assert (row["n_control"], row["n_treatment"]) == (len(yc), len(yt))
        if kind == "ratio":
            effect, se, df = ref.delta_ratio(yc, xc, yt, xt)
            assert row["method"] == "delta"
            assert row["abs_effect"] == pytest.approx(effect, rel=1e-9, abs=1e-12)
            half = (row["abs_ci_high"] - row["abs_ci_low"]) / 2
            # CIs are at the family's decision level (1 - alpha' for BH over the family)
            q = sps.t.ppf(1 - (1 - row["ci_level"]) / 2, df)
            assert half == pytest.approx(q * se, rel=1e-8)
            assert row["p_value"] == pytest.approx(2 * sps.t.sf(abs(effect) / se, df), rel=1e-7)
        else:
            effect, p = ref.welch(yc, yt)
            assert row["method"] == "welch"
            assert row["abs_effect"] == pytest.approx(effect, rel=1e-9, abs=1e-12)
            assert row["p_value"] == pytest.approx(p, rel=1e-8)
            assert row["control_mean"] == pytest.approx(yc.mean(), rel=1e-12)


def test_last_sequential_look_is_the_whole_run(no_pre_analysis):
    overall = _rows(no_pre_analysis, "all")
    seq = {s["metric"]: s for s in no_pre_analysis.details["sequential"]}
    assert set(seq) == set(overall)
    for metric, s in seq.items():
        assert s["day"] == [0, 1, 2, 3]
        assert s["abs_effect"][-1] == pytest.approx(overall[metric]["abs_effect"], rel=1e-9)
        assert s["p_value_fixed"][-1] == pytest.approx(overall[metric]["p_value"], rel=1e-8)
        # always valid ⇒ wider than the fixed-horizon interval, p never below it at the end
        assert s["p_value_always_valid"][-1] >= s["p_value_fixed"][-1]
        assert np.all(np.diff(s["p_value_always_valid"]) <= 0)


def test_cuped_rows_equal_ols_on_raw_values(run_effect, tmp_path):
    analysis = analyze_run(run_effect, tmp_path / "a.duckdb")
    rows = _rows(analysis, "all")
    post = ref.per_user(run_effect, "fake")
    pre = ref.per_user(run_effect, "fake__pre")
    assert (post["user_id"] == pre["user_id"]).all()
    arm = (post["arm"] == "treatment").cast(pl.Float64).to_numpy()
    for metric, column in (("gmv_per_user", "gmv"), ("completed_orders_per_user", "completed")):
        y, x = post[column].to_numpy(), pre[column].to_numpy()
        fit = sm.OLS(y, np.c_[np.ones_like(y), arm, x]).fit(cov_type="HC2")
        row = rows[metric]
        assert row["method"] == "cuped"
        assert row["abs_effect"] == pytest.approx(fit.params[1], rel=1e-9)
        half = (row["abs_ci_high"] - row["abs_ci_low"]) / 2
        z = sps.norm.ppf(1 - (1 - row["ci_level"]) / 2)  # the family's decision level
        assert half == pytest.approx(z * fit.bse[1], rel=5e-3)
    reductions = {c["metric"]: c["variance_reduction"] for c in analysis.details["cuped"]
                  if c["segment"] == "all"}
    assert reductions["completed_orders_per_user"] > 0.05
    # the injected +30% on orders: completed orders and GMV up ~30%, CTR untouched
    completed = rows["completed_orders_per_user"]
    assert completed["p_value"] < 1e-3 and completed["ci_low"] < 0.3 < completed["ci_high"]
    assert rows["ctr"]["ci_low"] < 0 < rows["ctr"]["ci_high"]
    assert rows["ctr"]["method"] == "cuped_delta"


def test_capped_metric_winsorizes_at_the_pooled_quantile(run_no_pre, tmp_path):
    metric = Metric("gmv_capped_test", "mean", REGISTRY["gmv_per_user"].numerator,
                    cap_quantile=0.9)
    register(metric)
    try:
        analysis = analyze_run(run_no_pre, tmp_path / "a.duckdb",
                               AnalysisConfig(metrics=("gmv_capped_test",)))
    finally:
        del REGISTRY["gmv_capped_test"]
    frame = ref.per_user(run_no_pre, "fake")
    cap = np.quantile(frame["gmv"].to_numpy(), 0.9)  # linear interpolation = quantile_cont
    assert analysis.details["caps"]["gmv_capped_test.y"] == pytest.approx(cap, rel=1e-12)
    yc, _ = ref.values(frame, "gmv_per_user", "control")
    yt, _ = ref.values(frame, "gmv_per_user", "treatment")
    effect, p = ref.welch(np.minimum(yc, cap), np.minimum(yt, cap))
    row = _rows(analysis, "all")["gmv_capped_test"]
    assert row["abs_effect"] == pytest.approx(effect, rel=1e-9)
    assert row["p_value"] == pytest.approx(p, rel=1e-8)
    last_look = analysis.details["sequential"][0]  # cumulative values capped the same way
    assert last_look["abs_effect"][-1] == pytest.approx(effect, rel=1e-9)
    assert last_look["p_value_fixed"][-1] == pytest.approx(p, rel=1e-8)


def test_aa_replicates_through_duckdb_agree_with_scipy(tmp_path):
    """A few whole A/A runs (different seeds) through the SQL path, checked row by row."""
    p_values = []
    for seed in range(6):
        run = write_fake_run(tmp_path / f"aa{seed}", FakeRunConfig(
            n_users=600, days=2, pre_days=0, seed=100 + seed, user_cohorts={}, event_cohorts={}))
        analysis = analyze_run(run, tmp_path / f"aa{seed}.duckdb",
                               AnalysisConfig(metrics=("gmv_per_user", "completed_orders_per_user",
                                                       "buyer_rate")))
        frame = ref.per_user(run, "fake")
        for metric, row in _rows(analysis, "all").items():
            _, p = ref.welch(ref.values(frame, metric, "control")[0],
                             ref.values(frame, metric, "treatment")[0])
            assert row["p_value"] == pytest.approx(p, rel=1e-8)
            p_values.append(row["p_value"])
    assert np.mean(np.array(p_values) < 0.05) <= 0.2  # an A/A run: no systematic signal


def test_partition_columns_inside_the_files_are_tolerated(run_no_pre, no_pre_analysis, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_no_pre, run)
    for path in (run / "events").rglob("*.parquet"):
        exp = path.parent.parent.name.split("=", 1)[1]
        day = int(path.parent.name.split("=", 1)[1])
        frame = pl.read_parquet(path, hive_partitioning=False).with_columns(
            pl.lit(exp).alias("experiment_id"), pl.lit(day, dtype=pl.Int32).alias("day"))
        frame.write_parquet(path)
    again = analyze_run(run, tmp_path / "a.duckdb")
    for a, b in zip(no_pre_analysis.results["rows"], again.results["rows"]):
        assert a["metric"] == b["metric"] and a["segment"] == b["segment"]
        assert a["p_value"] == pytest.approx(b["p_value"], rel=1e-9)


def test_three_arms_unequal_allocation_and_control_override(tmp_path):
    run = write_fake_run(tmp_path / "run", FakeRunConfig(
        n_users=1_200, days=2, pre_days=2, seed=3,
        arms={"control": 0.5, "a": 0.25, "b": 0.25}, user_cohorts={}, event_cohorts={}))
    analysis = analyze_run(run, tmp_path / "a.duckdb",
                           AnalysisConfig(control="a", metrics=("gmv_per_user", "ctr")))
    rows = analysis.results["rows"]
    assert {r["arm"] for r in rows} == {"control", "b"}
    srm = analysis.results["srm"]
    counts = pl.read_parquet(run / "assignments.parquet")["arm"].value_counts()
    observed = dict(counts.iter_rows())
    assert srm["observed_counts"] == observed
    expected = [1_200 * s for s in (0.5, 0.25, 0.25)]
    assert srm["p_value"] == pytest.approx(
        sps.chisquare([observed[a] for a in ("control", "a", "b")], expected).pvalue, rel=1e-10)


def test_bootstrap_option_gives_close_reproducible_cis(run_no_pre, tmp_path):
    cfg = AnalysisConfig(metrics=("gmv_per_user", "ctr"), bootstrap=400, seed=1, threads=1)
    first = analyze_run(run_no_pre, tmp_path / "a.duckdb", cfg)
    second = analyze_run(run_no_pre, tmp_path / "b.duckdb", cfg)
    assert first.results == second.results  # same seed, one thread: the same numbers
    other_seed = analyze_run(run_no_pre, tmp_path / "d.duckdb",
                             AnalysisConfig(metrics=("gmv_per_user",), bootstrap=400, seed=2))
    assert other_seed.results["rows"][0]["abs_ci_low"] != first.results["rows"][0]["abs_ci_low"]
    plain = analyze_run(run_no_pre, tmp_path / "c.duckdb",
                        AnalysisConfig(metrics=("gmv_per_user", "ctr")))
    for boot, exact in zip(first.results["rows"], plain.results["rows"]):
        if boot["metric"] == "ctr" or boot["segment"].startswith("day="):
            assert boot["method"] == exact["method"]  # ratios and days are not bootstrapped
            assert boot["abs_ci_low"] == pytest.approx(exact["abs_ci_low"], rel=1e-12)
            continue
        assert boot["method"] == "welch+bootstrap"
        assert boot["p_value"] == pytest.approx(exact["p_value"], rel=1e-12)
        width = exact["abs_ci_high"] - exact["abs_ci_low"]
        assert (boot["abs_ci_high"] - boot["abs_ci_low"]) == pytest.approx(width, rel=0.25)
    assert first.details["bootstrap"] == {"replicates": 400, "rows": 5,
                                          "dropped_replicates": 0, "dropped": []}


def test_store_file_is_released_after_analysis(run_no_pre, tmp_path):
    db = tmp_path / "a.duckdb"
    analyze_run(run_no_pre, db, AnalysisConfig(metrics=("ctr",)))
    con = duckdb.connect(str(db))  # would raise if the analysis still held the lock
    con.close()

"""Issue 19 (analysis side) and the analysis obstacles of issue 16: the events are reconciled
before anything is computed, the report is coherent, re-analysis gives the same bytes,
run folders move; bad input gives one clear error and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from analysis.analyze import analyze
from analysis.engine import AnalysisConfig, _sequential, analyze_run
from analysis.fake_events import FakeRunConfig, write_fake_run
from analysis.metrics import REGISTRY, Statistics
from analysis.stats import Moments
from analysis.store import AnalysisError, connect
from flows.cli import app
from tests.analysis import reference as ref


@pytest.fixture
def run(run_no_pre, tmp_path) -> Path:
    return Path(shutil.copytree(run_no_pre, tmp_path / "run"))


def _fails(run_dir: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(AnalysisError, match=match):
        analyze(run_dir, out, plots=False, **kwargs)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def _files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "events" / "experiment_id=fake").rglob("*.parquet"))


def _edit_manifest(run_dir: Path, edit) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 19.2 reconciliation


def test_a_stray_copy_of_an_events_file_is_an_error_naming_it(run, tmp_path):
    src = _files(run)[0]
    shutil.copy(src, src.with_name("part-copy.parquet"))
    _fails(run, tmp_path / "out", r"1 file\(s\) not listed there: \['events/experiment_id=fake/"
                                  r"day=0/part-copy.parquet'\]")


def test_a_missing_events_file_is_an_error_naming_it(run, tmp_path):
    gone = _files(run)[1]
    gone.unlink()
    _fails(run, tmp_path / "out", r"1 listed file\(s\) missing: \['events/experiment_id=fake/"
                                  + gone.parent.name + "/" + gone.name + r"'\]")


def test_without_a_file_list_the_counts_catch_a_stray_file(run, tmp_path):
    _edit_manifest(run, lambda m: m.pop("events_files"))
    src = _files(run)[0]
    shutil.copy(src, src.with_name("part-copy.parquet"))
    _fails(run, tmp_path / "out", r"event counts disagree with .*manifest.json.*fake/control/"
                                  r"impression: \d+ event\(s\) in the files, manifest says \d+")


def test_without_records_a_duplicated_file_breaks_the_unique_key(run, tmp_path):
    def strip(m):
        m.pop("events_files")
        m["counts"] = {}
    _edit_manifest(run, strip)
    src = _files(run)[0]
    shutil.copy(src, src.with_name("part-copy.parquet"))
    _fails(run, tmp_path / "out", r"duplicate events: the unique key \(request_id, item_id, "
                                  r"event_type\) repeats.*part-copy.parquet")


def test_exposure_srm_fires_when_an_arm_loses_impressions(run, tmp_path):
    _edit_manifest(run, lambda m: (m.pop("events_files"), m.update(counts={})))
    for path in (run / "events").rglob("*.parquet"):  # a third of treatment never exposed
        frame = pl.read_parquet(path, hive_partitioning=False)
        frame.filter(~((pl.col("arm") == "treatment") & (pl.col("user_id") % 3 == 0))
                     ).write_parquet(path)
    results = analyze(run, tmp_path / "out", plots=False)
    assert not results["srm"]["mismatch"]  # the assignments are fine
    assert results["srm"]["exposure"]["mismatch"]
    assert "EXPOSURE SAMPLE RATIO MISMATCH" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- 16.3 obstacles


def test_a_flat_events_folder_is_read(run, no_pre_rows, tmp_path):
    flat = []
    for path in sorted((run / "events").rglob("*.parquet")):
        exp = path.parent.parent.name.split("=", 1)[1]
        day = int(path.parent.name.split("=", 1)[1])
        flat.append(pl.read_parquet(path, hive_partitioning=False).with_columns(
            pl.lit(exp).alias("experiment_id"), pl.lit(day, dtype=pl.Int32).alias("day")))
    shutil.rmtree(run / "events")
    (run / "events").mkdir()
    for i, frame in enumerate(flat):
        frame.write_parquet(run / "events" / f"events-{i}.parquet")
    _edit_manifest(run, lambda m: m.pop("events_files"))
    rows = analyze_run(run, tmp_path / "a.duckdb").results["rows"]
    assert [(r["metric"], r["segment"]) for r in rows] == [(r["metric"], r["segment"])
                                                             for r in no_pre_rows]
    for a, b in zip(rows, no_pre_rows):
        assert a["p_value"] == pytest.approx(b["p_value"], rel=1e-9)


def test_duplicate_assignment_rows_are_named(run, tmp_path):
    units = pl.read_parquet(run / "assignments.parquet")
    pl.concat([units, units.filter(pl.col("unit_id") == 7)]).write_parquet(
        run / "assignments.parquet")
    _fails(run, tmp_path / "out", r"assignments.parquet: column 'unit_id': 1 unit\(s\) of "
                                  r"experiment 'fake' appear in more than one row.*unit_id 7: "
                                  r"2 rows")


def test_a_misspelled_event_type_is_named(run, tmp_path):
    _edit_manifest(run, lambda m: (m.pop("events_files"), m.update(counts={})))
    path = _files(run)[0]
    frame = pl.read_parquet(path, hive_partitioning=False)
    frame.with_columns(pl.col("event_type").replace("click", "clicks")).write_parquet(path)
    _fails(run, tmp_path / "out", r"column 'event_type': event_type 'clicks' is not an event "
                                  r"any metric reads; known: impression, click, order, cancel")


# ---------------------------------------------------------------- 19.6 coherence


@pytest.fixture(scope="module")
def no_pre_rows(run_no_pre, tmp_path_factory):
    return analyze_run(run_no_pre, tmp_path_factory.mktemp("db") / "a.duckdb").results["rows"]


@pytest.fixture(scope="module")
def small_days(tmp_path_factory):
    """Small days (few active users): where delta-method relative CIs fell below -100%."""
    run = write_fake_run(tmp_path_factory.mktemp("runs") / "small", FakeRunConfig(
        n_users=400, days=6, pre_days=3, seed=3, requests_per_user_day=0.15,
        effects={"treatment": 0.2}))
    return run, analyze_run(run, tmp_path_factory.mktemp("db") / "a.duckdb")


def test_relative_ci_and_p_value_agree_on_every_row(small_days):
    _, analysis = small_days
    checked = 0
    for r in analysis.results["rows"]:
        if r["ci_low"] is None:
            continue
        checked += 1
        assert r["ci_low"] >= -1.0 and r["ci_low"] <= r["ci_high"]
        excludes_rel = r["ci_low"] > 0 or r["ci_high"] < 0
        excludes_abs = r["abs_ci_low"] > 0 or r["abs_ci_high"] < 0
        if r["ci_low"] > -1.0:  # (a CI cut at -100% keeps its decision)
            assert excludes_rel == excludes_abs, r
        # the CI is at the level of the adjusted decision: it excludes 0 iff p_adj < alpha
        assert excludes_abs == (r["p_adjusted"] < 0.05), r
    assert checked > 10


def test_each_day_row_counts_that_days_units(small_days):
    run, analysis = small_days
    ev = ref.events(run, "fake")
    for r in analysis.results["rows"]:
        if r["segment"].startswith("day="):
            day = int(r["segment"].split("=")[1])
            active = ev.filter(pl.col("day") == day).group_by("arm").agg(
                pl.col("user_id").n_unique())
            n = dict(active.iter_rows())
            assert (r["n_control"], r["n_treatment"]) == (n["control"], n["treatment"])


def test_each_test_is_counted_once(small_days):
    _, analysis = small_days
    keys = {(r["metric"], r["segment"]) for r in analysis.results["rows"]}
    assert ("cold_item_completed_orders_per_user", "all") in keys
    assert ("completed_orders_per_user", "cold_item") not in keys
    assert ("cold_item_completed_orders_per_user", "cold_item") not in keys
    assert ("gmv_per_user", "cold_item") in keys  # no all-users twin: kept
    dup = {(x["metric"], x["segment"]): x["same_as"] for x in analysis.details["duplicates"]}
    assert dup[("completed_orders_per_user", "cold_item")] == \
        "cold_item_completed_orders_per_user@all"


def test_always_valid_cis_of_a_growing_cumulative_effect_are_never_empty():
    """Per-user cumulative sums whose effect starts on day 7 (it grows faster than
    linearly in time): the running intersection of the old looks was empty."""
    rng = np.random.default_rng(0)
    n, days = 4_000, 14
    daily = {a: rng.poisson(1.0, size=(n, days)).astype(float) for a in ("c", "t")}
    daily["t"][:, 7:] *= 1.5  # the effect appears in the second week
    cum = {a: np.cumsum(v, axis=1) for a, v in daily.items()}
    def raw(v):  # raw power sums, as the SQL's cumulative looks are
        v = v[:, None]
        return Moments(np.float64(len(v)), v.sum(axis=0), v.T @ v)
    looks = {a: Moments.stack([raw(cum[a][:, d]) for d in range(days)]) for a in cum}
    metric = REGISTRY["completed_orders_per_user"]
    st = Statistics([], {metric.name: {"control": looks["c"], "treatment": looks["t"]}},
                    list(range(days)), {"control": n, "treatment": n})
    state = {"planned_days": days, "tau2": {}}
    seq = _sequential(st, [metric], "control", ["treatment"], {}, AnalysisConfig(), state)[0]
    low, high = np.array(seq["abs_ci_low_always_valid"]), np.array(seq["abs_ci_high_always_valid"])
    assert np.all(low <= high)
    truth = cum["t"].mean(axis=0) - cum["c"].mean(axis=0)
    assert np.mean((low <= truth) & (truth <= high)) == 1.0
    assert seq["p_value_always_valid"][-1] < 1e-6  # the effect is found


def test_a_degenerate_stack_gets_a_health_warning(run, tmp_path):
    _edit_manifest(run, lambda m: (m.pop("events_files"), m.update(counts={}, slate_size=5)))
    for path in (run / "events").rglob("*.parquet"):
        frame = pl.read_parquet(path, hive_partitioning=False)
        frame.with_columns(pl.when(pl.col("arm") == "treatment").then(True)
                           .otherwise(pl.col("is_cold_item")).alias("is_cold_item")
                           ).write_parquet(path)
    analyze(run, tmp_path / "out", plots=False)
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["health"]["arms"]["treatment"]["cold_item_share"] == 1.0
    assert any("'treatment'" in w and "degenerate" in w for w in details["health"]["warnings"])
    assert not any("'control'" in w for w in details["health"]["warnings"])
    assert "DEGENERATE STACK?" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- 19.7 bytes and paths


def test_reanalysis_through_the_cli_gives_identical_bytes(run_no_pre, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = CliRunner().invoke(app, ["analyze", str(run_no_pre), "--out", str(out),
                                       "--threads", "1"])
        assert res.exit_code == 0, res.output
        outs.append(out)
    for f in ("results.json", "details.json", "report.md", "analysis_state.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_run_and_analysis_folders_can_move(run_no_pre, tmp_path):
    here = tmp_path / "here"
    shutil.copytree(run_no_pre, here / "run")
    analyze(here / "run", here / "out", plots=False, metrics=["ctr"])
    moved = tmp_path / "elsewhere"
    shutil.move(str(here), str(moved))
    with connect(moved / "out" / "events.duckdb", read_only=True) as con:
        n = con.execute("SELECT count(*) FROM exp_events").fetchone()[0]
    assert n == len(ref.events(moved / "run", "fake"))
    details = json.loads((moved / "out" / "details.json").read_text())
    assert details["run_dir"] == "../run"

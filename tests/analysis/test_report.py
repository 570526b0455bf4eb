"""The written report: files, exact result keys, SRM first and loud, power statement, CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from analysis.analyze import analyze
from analysis.engine import ROW_KEYS
from flows.cli import app


@pytest.fixture(scope="module")
def report(run_effect, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "out"
    return out, analyze(run_effect, out)


def test_analyze_writes_every_file_and_returns_the_results(report):
    out, results = report
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"results.json", "details.json", "report.md", "report.html", "events.duckdb",
                     "analysis_state.json", "plots/forest.png", "plots/sequential.png",
                     "plots/srm.png"}
    assert json.loads((out / "results.json").read_text()) == results
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_rows_have_exactly_the_agreed_keys(report):
    _, results = report
    assert set(results) == {"rows", "srm"}
    assert all(tuple(row) == ROW_KEYS for row in results["rows"])
    assert set(ROW_KEYS) == {"metric", "segment", "arm", "control_mean", "treatment_mean",
                             "abs_effect", "rel_effect", "ci_low", "ci_high", "abs_ci_low",
                             "abs_ci_high", "p_value", "p_adjusted", "n_control", "n_treatment",
                             "method", "family", "exploratory", "ci_level", "warning",
                             "replicates", "training_sd", "user_se", "per_replicate"}
    segments = {r["segment"] for r in results["rows"]}
    assert {"all", "cold_item", "cold_user", "cohort_vip", "cohort_mobile"} <= segments
    assert {f"day={d}" for d in range(5)} <= segments
    assert {"p_value", "expected_shares", "observed_counts"} <= set(results["srm"])
    assert sum(results["srm"]["observed_counts"].values()) == 3_000
    for row in results["rows"]:  # BH adjusted p is never below the raw p
        assert row["p_adjusted"] >= row["p_value"]


def test_html_is_self_contained_with_embedded_plots(report):
    out, _ = report
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"](http|/|\.)", page)  # nothing fetched from elsewhere


def test_report_states_srm_first_then_power(report):
    out, results = report
    md = (out / "report.md").read_text()
    srm, power, res = (md.index("Sample ratio mismatch"), md.index("Power"),
                       md.index("Results: all users"))
    assert srm < power < res
    assert "No sample ratio mismatch" in md
    for metric in ("gmv_per_user", "completed_orders_per_user",
                   "cold_item_completed_orders_per_user"):
        assert re.search(rf"`{metric}` \(treatment, cuped\): MDE [0-9.e+-]+ absolute", md)
    # 3,000 users cannot see a 2% uplift in cold-item orders: it must say so plainly.
    assert re.search(r"`cold_item_completed_orders_per_user`.*UNDERPOWERED", md)


def test_power_details_are_consistent(report):
    out, results = report
    details = json.loads((out / "details.json").read_text())
    rows = {r["metric"]: r for r in results["rows"] if r["segment"] == "all"}
    for p in details["power_analysis"]:
        row = rows[p["metric"]]
        half = (row["abs_ci_high"] - row["abs_ci_low"]) / 2  # t quantile · se
        z = sps.norm.ppf(1 - (1 - row["ci_level"]) / 2)  # CI at the family's decision level
        assert p["mde_abs"] == pytest.approx(half / z * 2.8016, rel=5e-3)
        assert p["underpowered"] == (p["mde_rel"] > p["target_uplift"])


def test_sample_ratio_mismatch_is_reported_first_and_loudly(run_no_pre, tmp_path):
    run = Path(shutil.copytree(run_no_pre, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["arms"] = {"control": 0.6, "treatment": 0.4}  # the data are 50/50
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(run), "--out", str(out), "--metric", "ctr"])
    assert result.exit_code == 0, result.output
    assert "SAMPLE RATIO MISMATCH" in " ".join(result.output.split())
    md = (out / "report.md").read_text()
    first_section = md[: md.index("## 2.")]
    assert "🚨 SAMPLE RATIO MISMATCH" in first_section and "NONE of the results" in first_section
    assert "class='alert'" in (out / "report.html").read_text()
    srm = json.loads((out / "results.json").read_text())["srm"]
    assert srm["mismatch"] and srm["p_value"] < 1e-10
    assert srm["expected_shares"] == {"control": 0.6, "treatment": 0.4}


def test_cli_bad_input_exits_nonzero_without_a_report(tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2  # bad input: the one error style
    assert "run directory not found" in " ".join(result.output.split())  # rich wraps lines
    assert not (tmp_path / "out").exists()

"""Bad input stops the analysis with a clear error and leaves no report behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from analysis.analyze import analyze
from analysis.fake_events import FakeRunConfig, write_fake_run
from analysis.store import AnalysisError


@pytest.fixture
def run(run_no_pre, tmp_path) -> Path:
    """A private copy of the shared A/A run, free to break."""
    return Path(shutil.copytree(run_no_pre, tmp_path / "run"))


def _fails(run_dir: Path, out: Path, match: str, **kwargs) -> None:
    """The analysis raises `AnalysisError` matching `match`, and `out` is left untouched."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "keep.txt").write_text("from an earlier run")
    with pytest.raises(AnalysisError, match=match):
        analyze(run_dir, out, plots=False, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging folder left over


def _rewrite_events(run_dir: Path, change) -> None:
    """Rewrite every event file; the manifest's event counts are dropped (as for a run
    without records) so the error under test is the one raised, not the reconciliation."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("events", "events_per_day"):
        manifest.get("counts", {}).pop(key, None)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    for path in (run_dir / "events").rglob("*.parquet"):
        frame = pl.read_parquet(path, hive_partitioning=False)
        change(frame).write_parquet(path)


def _edit_manifest(run_dir: Path, **changes) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_no_events(run, tmp_path):
    shutil.rmtree(run / "events")
    _fails(run, tmp_path / "out", r"events: no event Parquet files")


def test_no_events_for_the_experiment(run, tmp_path):
    _edit_manifest(run, experiment_id="other")
    _fails(run, tmp_path / "out", r"no events for experiment 'other'.*found experiments \['fake'\]")


def test_an_arm_missing_from_the_assignments(run, tmp_path):
    _edit_manifest(run, arms={"control": 0.4, "treatment": 0.4, "treatment_b": 0.2})
    _fails(run, tmp_path / "out", r"arm\(s\) \['treatment_b'\] of manifest.json have no assigned")


def test_an_arm_without_events(run, tmp_path):
    _rewrite_events(run, lambda f: f.filter(pl.col("arm") != "treatment"))
    _fails(run, tmp_path / "out", r"arm\(s\) \['treatment'\] have assigned units but no events")


def test_unknown_control_arm(run, tmp_path):
    _fails(run, tmp_path / "out", r"control arm 'nope' is not an arm", control="nope")


def test_unknown_metric(run, tmp_path):
    _fails(run, tmp_path / "out", r"unknown metric\(s\) \['gmv'\]; registered metrics: \[",
           metrics=["gmv"])


def test_zero_variance(tmp_path):
    # Nobody ever orders: GMV is 0 for every user in both arms.
    run = write_fake_run(tmp_path / "run", FakeRunConfig(n_users=300, days=2, pre_days=0,
                                                         p_order=0.0))
    # no order or cancel event at all: the metric has no events to read (not applicable)
    _fails(run, tmp_path / "out", r"metric 'gmv_per_user' cannot be measured on this run: no "
                                  r"cancel or order events",
           metrics=["gmv_per_user", "ctr"])


def test_events_whose_arm_disagrees_with_the_assignment(run, tmp_path):
    flip = pl.when(pl.col("user_id") == 7).then(
        pl.when(pl.col("arm") == "control").then(pl.lit("treatment")).otherwise(pl.lit("control"))
    ).otherwise(pl.col("arm"))
    _rewrite_events(run, lambda f: f.with_columns(flip.alias("arm")))
    _fails(run, tmp_path / "out", r"column 'arm': 1 user\(s\).*disagrees with assignments.parquet"
                                  r".*user 7=")


def test_events_of_users_never_assigned(run, tmp_path):
    units = pl.read_parquet(run / "assignments.parquet")
    units.filter(pl.col("unit_id") != 0).write_parquet(run / "assignments.parquet")
    _fails(run, tmp_path / "out", r"1 user\(s\).*1 of them not assigned at all")


def test_missing_event_column(run, tmp_path):
    _rewrite_events(run, lambda f: f.drop("value"))
    # asked for by name: an error naming the column
    _fails(run, tmp_path / "out", r"metric 'gmv_per_user' cannot be measured on this run: it "
                                  r"reads column 'value', which the events do not have",
           metrics=["gmv_per_user", "ctr"])
    # in the default set: not applicable, listed, the rest analysed
    results = analyze(run, tmp_path / "out2", plots=False)
    assert "gmv_per_user" not in {r["metric"] for r in results["rows"]}
    details = json.loads((tmp_path / "out2" / "details.json").read_text())
    assert {x["metric"] for x in details["not_applicable"]} == {"gmv_per_user", "aov"}


def test_missing_required_event_column(run, tmp_path):
    _rewrite_events(run, lambda f: f.drop("event_type"))
    _fails(run, tmp_path / "out", r"missing column\(s\) \['event_type'\] for the events schema")


def test_missing_manifest(run, tmp_path):
    (run / "manifest.json").unlink()
    _fails(run, tmp_path / "out", r"manifest.json: file not found")


def test_bad_settings(run, tmp_path):
    _fails(run, tmp_path / "out", r"alpha 1.5", alpha=1.5)
    _fails(run, tmp_path / "out2", r"correction 'bonferroni'", correction="bonferroni")


def test_zero_variance_metric_in_the_default_set_is_skipped_loudly(tmp_path):
    run = write_fake_run(tmp_path / "run", FakeRunConfig(n_users=300, days=2, pre_days=0,
                                                         cold_item_share=0.0))
    results = analyze(run, tmp_path / "out", plots=False)
    metrics = {r["metric"] for r in results["rows"] if r["segment"] == "all"}
    assert "cold_item_completed_orders_per_user" not in metrics and "gmv_per_user" in metrics
    md = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"NOT TESTED on all users: cold_item_completed_orders_per_user "
                     r"\(treatment\): zero variance", md)
    assert md.index("NOT TESTED") < md.index("## 3.")

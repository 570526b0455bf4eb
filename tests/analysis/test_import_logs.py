"""Issue 16: analyse your own A/B logs. `quasid import-logs` + `quasid analyze` on a small CSV
with a known CTR difference, checked against a direct two-sample computation; each bad
input gives its clear error and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from flows.cli import app


def make_ctr_log(path: Path, n_users: int = 3_000, seed: int = 0, ctr=(0.10, 0.12),
                 days: int = 3) -> pl.DataFrame:
    """A two-arm impression/click log as a CSV: user ids as strings, ISO timestamps, a
    platform column; CTR 10% in control, 12% in treatment (a +20% relative difference)."""
    rng = np.random.default_rng(seed)
    arm = np.where(rng.random(n_users) < 0.5, "control", "treatment")
    n_imp = rng.poisson(4.0, n_users) + 1
    user = np.repeat(np.arange(n_users), n_imp)
    p = np.where(arm[user] == "control", ctr[0], ctr[1])
    clicked = rng.random(len(user)) < p
    seconds = rng.integers(0, days * 86_400, len(user))
    t0 = np.datetime64("2024-05-01T00:00:00")
    stamp = (t0 + seconds.astype("timedelta64[s]")).astype(str)
    platform = np.where(rng.random(n_users) < 0.6, "mobile", "desktop")[user]
    imp = pl.DataFrame({"user": [f"u{u:05d}" for u in user], "variant": arm[user],
                        "timestamp": stamp, "event": "impression", "platform": platform})
    clk = imp.filter(pl.Series(clicked)).with_columns(pl.lit("click").alias("event"))
    log = pl.concat([imp, clk]).sort("timestamp", "user", "event")
    log.write_csv(path)
    return log


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _import(csv: Path, run: Path, *extra: str):
    return _cli("import-logs", csv, "--out", run, "--unit", "user", "--arm", "variant",
                "--time", "timestamp", "--event", "event", *extra)


@pytest.fixture(scope="module")
def ctr_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ctr")
    log = make_ctr_log(base / "ab_log.csv")
    res = _import(base / "ab_log.csv", base / "run", "--control", "control",
                  "--shares", "control=0.5,treatment=0.5", "--segment", "platform")
    assert res.exit_code == 0, res.output
    res = _cli("analyze", base / "run", "--out", base / "report", "--primary", "ctr")
    assert res.exit_code == 0, res.output
    return base, log


def _direct_ctr(log: pl.DataFrame, alpha: float) -> dict:
    """The two-sample delta-method test of clicks/impressions on per-user sums, by hand."""
    per_user = log.group_by("user", "variant").agg(
        (pl.col("event") == "click").sum().cast(pl.Float64).alias("y"),
        (pl.col("event") == "impression").sum().cast(pl.Float64).alias("x"))
    arms = {}
    for a in ("control", "treatment"):
        f = per_user.filter(pl.col("variant") == a)
        y, x = f["y"].to_numpy(), f["x"].to_numpy()
        r = y.sum() / x.sum()
        lin = (y - r * x) / x.mean()
        arms[a] = (r, lin.var(ddof=1) / len(y), len(y))
    (rc, vc, nc), (rt, vt, nt) = arms["control"], arms["treatment"]
    d, se = rt - rc, np.sqrt(vc + vt)
    df = (vc + vt) ** 2 / (vc**2 / (nc - 1) + vt**2 / (nt - 1))
    q = sps.t.ppf(1 - alpha / 2, df)
    # Fieller: {r : (d - r*rc)^2 <= q^2 Var(d - r*rc)}, Cov(d, rc) = -vc
    a = rc**2 - q**2 * vc
    b = d * rc + q**2 * vc
    c = d**2 - q**2 * (vc + vt)
    root = np.sqrt(b**2 - a * c)
    return {"control_mean": rc, "treatment_mean": rt, "abs_effect": d,
            "abs_ci_low": d - q * se, "abs_ci_high": d + q * se,
            "p_value": 2 * sps.t.sf(abs(d) / se, df), "rel_effect": d / rc,
            "ci_low": (b - root) / a, "ci_high": (b + root) / a, "n_control": nc,
            "n_treatment": nt}


def test_ctr_row_equals_a_direct_two_sample_computation(ctr_run):
    base, log = ctr_run
    results = json.loads((base / "report" / "results.json").read_text())
    row = next(r for r in results["rows"] if r["metric"] == "ctr" and r["segment"] == "all")
    assert row["family"] == "primary" and row["method"] == "delta" and row["ci_level"] == 0.95
    want = _direct_ctr(log, 0.05)
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert row["p_value"] < 1e-3 and row["ci_low"] < 0.2 < row["ci_high"]  # the +20% is found
    assert not results["srm"]["mismatch"] and not results["srm"]["exposure"]["mismatch"]


def test_metrics_without_their_events_are_not_applicable_not_alarms(ctr_run):
    base, _ = ctr_run
    details = json.loads((base / "report" / "details.json").read_text())
    na = {x["metric"] for x in details["not_applicable"]}
    assert na == {"gmv_per_user", "completed_orders_per_user",
                  "cold_item_completed_orders_per_user", "buyer_rate", "conversion", "aov"}
    md = (base / "report" / "report.md").read_text()
    assert "NOT TESTED" not in md and "no primary metric analysed" not in md
    assert "Not applicable to this run" in md
    segments = {s["name"] for s in details["segments"]}
    assert {"cohort_platform_mobile", "cohort_platform_desktop"} <= segments


def test_the_run_directory_is_normal_and_says_what_was_filled(ctr_run):
    base, log = ctr_run
    run = base / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["arms"] == {"control": 0.5, "treatment": 0.5}
    assert manifest["control"] == "control" and manifest["days"] == 3
    assert any("request_id" in f for f in manifest["filled"])
    files = sorted(str(p.relative_to(run)) for p in (run / "events").rglob("*.parquet"))
    assert files == manifest["events_files"] and len(files) == 3
    ev = pl.read_parquet(run / "events", hive_partitioning=True)
    assert ev.height == log.height
    units = pl.read_parquet(run / "unit_ids.parquet")
    assert units.height == log["user"].n_unique()


def test_a_metrics_file_defines_the_metrics(ctr_run, tmp_path):
    base, _ = ctr_run
    (tmp_path / "m.yaml").write_text(
        "metrics:\n"
        "  - name: clicks_per_user\n    kind: mean\n    numerator: \"(event_type = 'click')\"\n"
        "    role: primary\n"
        "  - name: ctr\n    kind: ratio\n    numerator: \"(event_type = 'click')\"\n"
        "    denominator: \"(event_type = 'impression')\"\n    role: guardrail\n"
        "    margin: 0.5\n")
    res = _cli("analyze", base / "run", "--out", tmp_path / "out", "--metrics",
               tmp_path / "m.yaml")
    assert res.exit_code == 0, res.output
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert [m["name"] for m in details["metrics"]] == ["clicks_per_user", "ctr"]
    assert details["guardrails"][0]["verdict"] == "non-inferior"
    (tmp_path / "bad.yaml").write_text("metrics:\n  - name: x\n    kind: ratio\n"
                                       "    numerator: '1'\n")
    res = _cli("analyze", base / "run", "--out", tmp_path / "out2", "--metrics",
               tmp_path / "bad.yaml")
    assert res.exit_code == 2 and "a denominator is required" in " ".join(res.output.split())
    assert not (tmp_path / "out2").exists()


def _bad(tmp_path: Path, change, match: str, *extra: str, log_name: str = "log.csv"):
    log = make_ctr_log(tmp_path / "clean.csv", n_users=200)
    change(log).write_csv(tmp_path / log_name)
    res = _import(tmp_path / log_name, tmp_path / "run", *extra)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert pytest.importorskip("re").search(match, text), text
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.*"))


def test_a_misspelled_event_type_is_named(tmp_path):
    _bad(tmp_path, lambda f: f.with_columns(pl.col("event").replace("click", "clicks")),
         r"log.csv: column 'event': event_type 'clicks' is not an event any metric reads "
         r"\(\d+ row\(s\)\); known: impression, click, order, cancel")


def test_duplicate_events_are_an_error(tmp_path):
    _bad(tmp_path, lambda f: pl.concat([f, f.head(3)]),
         r"log.csv: 6 row\(s\) are duplicate events")


def test_a_unit_in_two_arms_is_an_error(tmp_path):
    def flip(f):  # one event of the busiest user logged under the other arm
        busy = f.group_by("user").len().sort("len", "user", descending=True)["user"][0]
        row = f.with_row_index().filter(pl.col("user") == busy)["index"][0]
        other = pl.when(pl.col("variant") == "control").then(pl.lit("treatment")).otherwise(
            pl.lit("control"))
        return f.with_row_index().with_columns(
            pl.when(pl.col("index") == row).then(other).otherwise(pl.col("variant"))
            .alias("variant")).drop("index")
    _bad(tmp_path, flip, r"column 'variant': 1 unit\(s\) have events in more than one arm")


def test_duplicate_assignment_rows_and_colliding_ids(tmp_path):
    log = make_ctr_log(tmp_path / "log.csv", n_users=200)
    units = log.select("user", "variant").unique().sort("user")
    pl.concat([units, units.head(1)]).write_csv(tmp_path / "assign.csv")
    res = _import(tmp_path / "log.csv", tmp_path / "run", "--assignments",
                  tmp_path / "assign.csv")
    assert res.exit_code == 2
    assert re.search(r"assign.csv: column 'user': 1 unit\(s\) appear in more than one row",
                     " ".join(res.output.split()))
    assert not (tmp_path / "run").exists()
    swapped = units.with_columns(pl.when(pl.col("variant") == "control").then(
        pl.lit("treatment")).otherwise(pl.lit("control")).alias("variant"))
    swapped.write_csv(tmp_path / "assign2.csv")
    res = _import(tmp_path / "log.csv", tmp_path / "run", "--assignments",
                  tmp_path / "assign2.csv")
    assert res.exit_code == 2
    assert "have another arm in the assignments than in the events" in " ".join(
        res.output.split())
    assert not (tmp_path / "run").exists()


def test_assignments_add_units_without_events(tmp_path):
    log = make_ctr_log(tmp_path / "log.csv", n_users=200)
    units = log.select("user", "variant").unique().sort("user")
    extra = pl.DataFrame({"user": ["z1", "z2"], "variant": ["control", "treatment"]})
    pl.concat([units, extra]).write_csv(tmp_path / "assign.csv")
    res = _import(tmp_path / "log.csv", tmp_path / "run", "--assignments",
                  tmp_path / "assign.csv")
    assert res.exit_code == 0, res.output
    a = pl.read_parquet(tmp_path / "run" / "assignments.parquet")
    assert a.height == units.height + 2


def test_unknown_arm_in_shares_and_missing_column(tmp_path):
    _bad(tmp_path, lambda f: f, r"--shares: arm\(s\) \['treatment'\] found in the logs",
         "--shares", "control=0.5,b=0.5")
    _bad(tmp_path, lambda f: f.drop("timestamp"), r"log.csv: no column 'timestamp' "
         r"\(given by --time\)")


import re  # noqa: E402  (used by the tests above)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Analyse your own A/B logs" commands, run verbatim, give its CTR row."""
    import shlex

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    section = text[text.index("## Analyse your own A/B logs"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("python -c"):
            make_ctr_log(Path("ab_log.csv"))
        elif line.startswith("quasid "):
            res = CliRunner().invoke(app, shlex.split(line)[1:])
            assert res.exit_code == 0, (line, res.output)
            ran.append(shlex.split(line)[1])
    assert ran == ["import-logs", "analyze"]
    results = json.loads((tmp_path / "runs" / "ab_report" / "results.json").read_text())
    row = next(r for r in results["rows"] if r["metric"] == "ctr" and r["segment"] == "all")
    table = re.search(r"\| ctr \| ([^|]+) \| ([^|]+) \| ([^|]+) \| \[([^,]+), ([^\]]+)\]",
                      section)
    assert f"{row['control_mean']:.4g}" == table.group(1).strip()
    assert f"{row['treatment_mean']:.4g}" == table.group(2).strip()
    assert f"{100 * row['rel_effect']:+.2f}%" == table.group(3).strip()
    assert f"{100 * row['ci_low']:+.2f}%" == table.group(4).strip()

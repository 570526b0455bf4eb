"""Training replicates: the estimator against a hand computation, its calibration, the cells
of the split, and the analysis of a run whose arms have several replicates."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from analysis.engine import AnalysisConfig, analyze_run
from analysis.stats import replicate_test, replicates_needed


def test_replicate_test_matches_a_hand_computation():
    res = replicate_test(np.array([1.0, 2.0, 3.0]), np.full(3, 0.1),
                         np.array([2.0, 4.0, 3.0]), np.full(3, 0.2), alpha=0.05)
    # arm means 2 and 3; S² = 1 in both arms -> V = 1/3 + 1/3, Welch-Satterthwaite df = 4
    assert res.abs_effect == pytest.approx(1.0)
    assert res.abs_se == pytest.approx(math.sqrt(2 / 3))
    assert res.df == pytest.approx(4.0)
    q = sps.t.ppf(0.975, 4)
    assert res.abs_ci_low == pytest.approx(1 - q * math.sqrt(2 / 3))
    assert res.p_value == pytest.approx(2 * sps.t.sf(1 / math.sqrt(2 / 3), 4))
    assert res.user_se == pytest.approx(math.sqrt(0.1 / 3 + 0.2 / 3))
    assert res.training_sd == pytest.approx(math.sqrt(0.9 + 0.8))
    assert res.rel_effect == pytest.approx(0.5)
    assert [p["abs_effect"] for p in res.per_replicate] == pytest.approx([0.0, 2.0, 1.0])
    # one replicate in an arm: that arm adds its users' variance, with no df of its own
    one = replicate_test(np.array([2.0]), np.array([0.1]), np.array([2.0, 4.0, 3.0]),
                         np.full(3, 0.2))
    assert one.abs_se == pytest.approx(math.sqrt(0.1 + 1 / 3))
    assert one.df == pytest.approx((0.1 + 1 / 3) ** 2 / ((1 / 3) ** 2 / 2))


def test_cell_estimates_adjust_every_cell_with_one_pooled_theta():
    from analysis.stats import Moments, cell_estimates

    rng = np.random.default_rng(3)
    cells = []
    for shift in (0.0, 0.5, 1.0):
        x = rng.normal(size=200) + shift
        y = 2.0 * x + rng.normal(size=200)
        cells.append(np.column_stack([y, x]))
    point, var, n = cell_estimates([Moments.of(c) for c in cells], ratio=False, cuped=True)
    sxy = sum((len(c) - 1) * np.cov(c[:, 0], c[:, 1])[0, 1] for c in cells)
    sxx = sum((len(c) - 1) * np.var(c[:, 1], ddof=1) for c in cells)
    theta = sxy / sxx
    x_all = np.concatenate([c[:, 1] for c in cells]).mean()
    for c, p, v in zip(cells, point, var):
        assert p == pytest.approx(c[:, 0].mean() - theta * (c[:, 1].mean() - x_all))
        assert v == pytest.approx(np.var(c[:, 0] - theta * c[:, 1], ddof=1) / len(c))
    assert list(n) == [200, 200, 200]


def _coverage(replicates: int, training_sd: float, user_sd: float, reps: int, seed: int
              ) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    shape = (reps, replicates)
    user_var = user_sd**2
    c = training_sd * rng.standard_normal(shape) + user_sd * rng.standard_normal(shape)
    t = training_sd * rng.standard_normal(shape) + user_sd * rng.standard_normal(shape)
    v = np.full(replicates, user_var)
    aware = users_only = 0
    for i in range(reps):  # the true effect is 0: each replicate's training is a fresh draw
        res = replicate_test(c[i], v, t[i], v)
        aware += res.abs_ci_low <= 0.0 <= res.abs_ci_high
        users_only += abs(res.abs_effect) <= 1.96 * res.user_se
    return aware / reps, users_only / reps


@pytest.mark.parametrize("replicates", [3, 5])
def test_replicate_aware_ci_covers_and_the_users_only_ci_does_not(replicates):
    aware, users_only = _coverage(replicates, training_sd=0.3, user_sd=0.2, reps=1500, seed=1)
    assert 0.93 <= aware <= 0.97
    assert users_only < 0.75


def test_without_training_noise_the_aware_ci_still_covers():
    aware, users_only = _coverage(4, training_sd=0.0, user_sd=0.2, reps=1500, seed=2)
    assert 0.93 <= aware <= 0.97 and 0.93 <= users_only <= 0.97


def test_replicates_needed():
    # SE needed for 80% power at 5%: 1 / (1.96 + 0.8416) = 0.3569; room = 0.3569² - 0.1²
    needed = replicates_needed(1.0, 0.1, 1.0)
    room = (1 / (sps.norm.ppf(0.975) + sps.norm.ppf(0.8))) ** 2 - 0.01
    assert needed == math.ceil(1.0 / room)
    assert replicates_needed(1.0, 1.0, 1.0) is None  # users alone too noisy


def test_replicate_cells_are_balanced_and_stable():
    from simulator.splitter import Allocation, assign_arms, replicate_of

    alloc = Allocation((("control", 0.05), ("treatment", 0.05)), salt="layer",
                       replicates=(3, 4))
    units = np.arange(400_000)
    arm, bucket = assign_arms(units, alloc)
    cells = replicate_of(arm, bucket, alloc)
    again = replicate_of(*assign_arms(units, alloc), alloc)
    assert np.array_equal(cells, again)
    for a, r in ((0, 3), (1, 4)):
        share = np.bincount(cells[arm == a], minlength=r) / (arm == a).sum()
        assert share.min() > 1 / r - 0.02 and share.max() < 1 / r + 0.02
        # a cell is a set of buckets: no bucket is split between cells
        frame = pl.DataFrame({"bucket": bucket[arm == a], "cell": cells[arm == a]})
        assert frame.group_by("bucket").agg(pl.col("cell").n_unique())["cell"].max() == 1
    with pytest.raises(ValueError, match="replicates"):
        Allocation((("control", 0.5), ("treatment", 0.5)), salt="x", replicates=(2,))


@pytest.fixture(scope="module")
def replicate_run(tmp_path_factory):
    from quasid.data.synthetic import WorldConfig, synthesize
    from simulator.config import parse_config
    from simulator.replay import run_experiment

    base = tmp_path_factory.mktemp("replicates")
    synthesize(WorldConfig(n_items=300, n_users=1500, content_dim=8, taste_dim=4, seed=5),
               base / "world")
    cfg = parse_config({
        "experiment_id": "reps", "data": {"path": str(base / "world")}, "days": 3,
        "pre_days": 0, "slate_size": 5,
        "arms": [{"name": "control", "stack": "random", "allocation": 0.5, "replicates": 3},
                 {"name": "treatment", "stack": "random", "allocation": 0.5, "replicates": 3,
                  "options": {"seed": 100}}]})
    run_experiment(cfg, base / "run")
    return base / "run"


def test_a_replicated_run_reports_the_replicate_aware_effect(replicate_run, tmp_path):
    analysis = analyze_run(replicate_run, tmp_path / "a.duckdb", AnalysisConfig())
    rows = {(r["metric"], r["segment"]): r for r in analysis.results["rows"]}
    row = rows["gmv_per_user", "all"]
    assert row["replicates"] == {"control": 3, "treatment": 3}
    assert row["method"].endswith("+replicates") and len(row["per_replicate"]) == 3
    assert row["training_sd"] is not None and row["user_se"] > 0
    # the effect is the mean over replicates of each cell's mean (by hand from the events)
    assignments = pl.read_parquet(replicate_run / "assignments.parquet")
    events = pl.read_parquet(replicate_run / "events" / "experiment_id=reps" / "**" / "*.parquet")
    gmv = (events.group_by("user_id").agg(
        (pl.when(pl.col("event_type") == "order").then(pl.col("value"))
         .when(pl.col("event_type") == "cancel").then(-pl.col("value")).otherwise(0.0))
        .sum().alias("gmv")))
    per_user = assignments.join(gmv, left_on="unit_id", right_on="user_id", how="left") \
        .with_columns(pl.col("gmv").fill_null(0.0))
    cells = per_user.group_by("arm", "replicate").agg(pl.col("gmv").mean()).sort("arm", "replicate")
    means = {a: cells.filter(pl.col("arm") == a)["gmv"].mean() for a in ("control", "treatment")}
    assert row["method"] == "welch+replicates"  # no pre-period: no covariate
    assert row["abs_effect"] == pytest.approx(means["treatment"] - means["control"], rel=1e-9)
    per = cells.filter(pl.col("arm") == "treatment")["gmv"].to_numpy() - means["control"]
    assert [p["abs_effect"] for p in row["per_replicate"]] == pytest.approx(per, rel=1e-9)
    # days stay users-only (exploratory), and say so
    day = next(r for r in analysis.results["rows"] if r["segment"].startswith("day="))
    assert day["training_sd"] is None and "not the training" in day["warning"]
    assert analysis.details["replicates"] == {"control": 3, "treatment": 3}


def test_one_replicate_says_training_noise_is_not_covered(run_effect, tmp_path):
    analysis = analyze_run(run_effect, tmp_path / "a.duckdb", AnalysisConfig())
    for row in analysis.results["rows"]:
        assert row["replicates"] == {"control": 1, row["arm"]: 1}
        assert row["training_sd"] is None and row["per_replicate"] == []
        assert "not the training's" in row["warning"]
        assert not row["method"].endswith("+replicates")
    assert analysis.details["replicate_summary"] == []

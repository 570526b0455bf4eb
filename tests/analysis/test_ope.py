"""Off-policy estimates (analysis/ope.py): unbiased with calibrated CIs under uniformly random
slate logging, and end to end through import-logs --propensity and `quasid ope` on traffic
logged by the simulator's random stack (benchmarks/ope_synthetic.py measures >= 20 seeds)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from analysis.ope import Slots, estimate
from flows.cli import app


def _replicate(rng, n_req=4_000, n_items=40, k=3):
    """Uniform random slates of k distinct items; click prob q_a * b_k; the target shows
    the same k items (by its own order) to everybody."""
    q = rng.uniform(0.05, 0.6, n_items)
    b = 1.0 / np.arange(1, k + 1) ** 0.8
    logged = np.argsort(rng.random((n_req, n_items)), axis=1)[:, :k]
    clicks = rng.random((n_req, k)) < q[logged] * b
    target = np.broadcast_to(np.argsort(-q)[:k], (n_req, k))
    truth = float((q[target] * b).mean())
    slots = Slots(np.repeat(np.arange(n_req), k), np.tile(np.arange(k), n_req),
                  logged.ravel(), np.full(n_req * k, 1.0 / n_items), target.ravel(),
                  {"ctr": clicks.ravel().astype(float)})
    return slots, truth


def test_estimators_are_unbiased_with_calibrated_cis():
    rng = np.random.default_rng(0)
    values: dict[str, list] = {}
    for _ in range(120):
        slots, truth = _replicate(rng)
        for row in estimate(slots)["estimates"]["ctr"]:
            values.setdefault(row["estimator"], []).append(
                (row["value"] - truth, row["ci_low"] <= truth <= row["ci_high"], row["se"]))
    assert set(values) == {"ips", "snips", "dr", "replay"}
    for est, rows in values.items():
        err = np.array([r[0] for r in rows])
        cover = np.mean([r[1] for r in rows])
        assert abs(err.mean()) < 3 * err.std() / np.sqrt(len(err)), est  # no bias
        assert 0.88 <= cover <= 0.99, (est, cover)
        assert np.mean([r[2] for r in rows]) == pytest.approx(err.std(), rel=0.25), est


def test_replay_needs_uniform_logging():
    rng = np.random.default_rng(1)
    slots, _ = _replicate(rng, n_req=500)
    p = slots.propensity.copy()
    p[::2] *= 1.5
    res = estimate(Slots(slots.request, slots.position, slots.item, p, slots.target,
                         slots.rewards))
    assert not res["uniform_logging"]
    assert {r["estimator"] for r in res["estimates"]["ctr"]} == {"ips", "snips", "dr"}


def test_ope_end_to_end_on_random_stack_logs(tmp_path):
    """The simulator's random stack logs traffic of a synthetic world; import-logs keeps the
    propensity (1/n_items); `quasid ope` estimates the popularity stack's CTR."""
    pytest.importorskip("simulator.baselines")
    from quasid.data.synthetic import WorldConfig, generate
    from simulator.baselines import PopularityRecommender, RandomRecommender
    from simulator.responses import TrueWorld, respond

    items, inter, world = generate(WorldConfig(n_items=100, n_users=500, content_dim=8,
                                               taste_dim=4, seed=2))
    truth_world = TrueWorld(world)
    n, k = 6_000, 4
    rng = np.random.default_rng(2)
    users = rng.integers(0, 500, n)
    req = np.arange(n, dtype=np.int64)
    logged, _ = RandomRecommender(items["item_id"].to_numpy(), seed=2).recommend(
        req[:, None], k, users)
    resp = respond(truth_world, users, logged, req, 2)
    rows = pl.DataFrame({"request": np.repeat(req, k), "user": np.repeat(users, k),
                         "item": logged.ravel(), "pos": np.tile(np.arange(k), n),
                         "ts": np.repeat(req, k) * 10, "variant": "random",
                         "click": resp.click.ravel(), "propensity": 1.0 / 100})
    imp = rows.with_columns(pl.lit("impression").alias("event"))
    clk = rows.filter(pl.col("click")).with_columns(pl.lit("click").alias("event"))
    log = pl.concat([imp, clk]).drop("click")
    # a second arm so that the run directory is a valid A/B run (same logging policy)
    log = log.with_columns(pl.when(pl.col("user") % 2 == 0).then(pl.lit("random"))
                           .otherwise(pl.lit("random_b")).alias("variant"))
    log.write_parquet(tmp_path / "log.parquet")
    res = CliRunner().invoke(app, [
        "import-logs", str(tmp_path / "log.parquet"), "--out", str(tmp_path / "run"),
        "--unit", "user", "--arm", "variant", "--time", "ts", "--event", "event",
        "--item", "item", "--position", "pos", "--request", "request",
        "--propensity", "propensity"])
    assert res.exit_code == 0, res.output
    target = PopularityRecommender.fit(items["item_id"].to_numpy(),
                                       inter["item_id"].to_numpy()).recommend(
        np.full((n, 1), -1, dtype=np.int64), k)[0]
    pl.DataFrame({"request_id": np.repeat(req, k), "position": np.tile(np.arange(k), n),
                  "item_id": target.ravel()}).write_parquet(tmp_path / "target.parquet")
    res = CliRunner().invoke(app, ["ope", str(tmp_path / "run"), "--target",
                                   str(tmp_path / "target.parquet"), "--out",
                                   str(tmp_path / "ope.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "ope.json").read_text())
    assert out["uniform_logging"] and out["requests"] == n
    truth = float(truth_world.probabilities(users, target).click.mean())
    for row in out["estimates"]["ctr"]:
        assert row["ci_low"] < truth < row["ci_high"], row
        assert abs(row["value"] - truth) < 0.25 * truth, row

"""The replay engine end to end on the small synthetic world: events, shards, reruns, effects."""

from __future__ import annotations

import copy
import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from quasid.core.schemas import EVENTS, validate
from simulator.config import parse_config
from simulator.events import events_digest, read_events
from simulator.replay import run_experiment, run_shard
from simulator.rundir import RunDirError, build_assignments, prepare


@pytest.fixture()
def run_dir(base_config, tmp_path) -> Path:
    """One uninterrupted single-shard run of the base config."""
    out = tmp_path / "run1"
    run_experiment(base_config, out, n_shards=1)
    return out


def test_funnel_invariants_and_values(run_dir, base_config, small_world):
    events = read_events(run_dir, "exp")
    validate(events, EVENTS, source="events")
    k = base_config["slate_size"]
    imp = events.filter(pl.col("event_type") == "impression")
    per_request = imp.group_by("request_id").agg(pl.len(), pl.col("position").sort())
    assert (per_request["len"] == k).all()
    assert per_request["position"].to_list()[0] == list(range(k))

    key = ["request_id", "item_id"]
    by_type = {t: events.filter(pl.col("event_type") == t) for t in ("impression", "click", "order",
                                                                     "cancel")}
    # each click was shown, each order was clicked, each cancel voids an order
    for child, parent in (("click", "impression"), ("order", "click"), ("cancel", "order")):
        missing = by_type[child].join(by_type[parent], on=key, how="anti")
        assert missing.height == 0, f"{child} without {parent}"
        assert by_type[child].height <= by_type[parent].height
    assert by_type["click"].height > 0 and by_type["cancel"].height > 0

    prices = small_world.items.select("item_id", "price")
    orders = by_type["order"].join(prices, on="item_id")
    assert (orders["quantity"] >= 1).all()
    assert np.allclose(orders["value"], orders["price"] * orders["quantity"])
    cancels = by_type["cancel"].join(by_type["order"], on=key, suffix="_order")
    assert (cancels["value"] == cancels["value_order"]).all()
    assert (cancels["quantity"] == cancels["quantity_order"]).all()
    zero = events.filter(pl.col("event_type").is_in(["impression", "click"]))
    assert (zero["value"] == 0).all() and (zero["quantity"] == 0).all()

    completed = orders.join(by_type["cancel"], on=key, how="anti")
    gmv = by_type["order"]["value"].sum() - by_type["cancel"]["value"].sum()
    assert gmv == pytest.approx(float((completed["price"] * completed["quantity"]).sum()))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    total = sum(a["gmv_cents"] for a in manifest["counts"]["experiment"].values())
    assert total == round(gmv * 100)
    assert sum(a["clicks"] for a in manifest["counts"]["experiment"].values()) == \
        by_type["click"].height


def test_events_carry_arms_days_and_cohort_flags(run_dir, base_config, small_world):
    assignments = pl.read_parquet(run_dir / "assignments.parquet")
    events = read_events(run_dir)
    main = events.filter(pl.col("experiment_id") == "exp")
    pre = events.filter(pl.col("experiment_id") == "exp__pre")
    assert pre.height > 0 and (pre["arm"] == "control").all()
    assert set(pre["user_id"].unique()) <= set(assignments["unit_id"])
    assert main["day"].min() == 0 and main["day"].max() == base_config["days"] - 1
    assert pre["day"].max() <= base_config["pre_days"] - 1

    joined = main.join(assignments.rename({"unit_id": "user_id"}), on="user_id", suffix="_a")
    assert joined.height == main.height
    assert (joined["arm"] == joined["arm_a"]).all()
    assert (joined["is_cold_user"] == joined["is_cold_user_a"]).all()
    assert (joined["cohort_heavy"] == joined["cohort_heavy_a"]).all()

    items = small_world.items.select("item_id", "price", "is_cold")
    flagged = main.join(items, on="item_id")
    assert (flagged["is_cold_item"] == flagged["is_cold"]).all()
    assert (flagged["cohort_premium"] == (flagged["price"] > 30)).all()
    assert flagged["is_cold_item"].any()  # the window shows new items (random arm)

    # cold users: at most 3 interactions before the window
    cutoff = small_world.cutoff_ts
    n_train = (small_world.interactions.filter(pl.col("ts") < cutoff)
               .group_by("user_id").len())
    check = assignments.join(n_train, left_on="unit_id", right_on="user_id", how="left")
    assert (check["is_cold_user"] == (check["len"].fill_null(0) <= 3)).all()
    assert (check["cohort_heavy"] == (check["len"].fill_null(0) >= 8)).all()


def test_one_shard_and_four_shards_give_identical_events(run_dir, base_config, tmp_path):
    out4 = tmp_path / "run4"

    def map_fn(fn, shards):  # as a task runner would: the shard job travels pickled
        return [pickle.loads(pickle.dumps(fn))(shard) for shard in reversed(list(shards))]

    manifest4 = run_experiment(base_config, out4, n_shards=4, map_fn=map_fn)
    assert len(list((out4 / "events").rglob("part-*-of-00004.parquet"))) > 4
    assert events_digest(out4) == events_digest(run_dir)
    manifest1 = json.loads((run_dir / "manifest.json").read_text())
    assert manifest4["counts"] == manifest1["counts"]
    other = copy.deepcopy(base_config)
    other["seed"] = 4
    out_seed = tmp_path / "seed4"
    run_experiment(other, out_seed, n_shards=1)
    assert events_digest(out_seed) != events_digest(run_dir)  # the digest can tell runs apart


def test_assignments_written_first_and_rebuilt_from_the_salt(base_config, tmp_path):
    out = tmp_path / "prepared"
    prepare(base_config, out, n_shards=2)
    assert (out / "assignments.parquet").exists() and not (out / "events").exists()
    written = pl.read_parquet(out / "assignments.parquet")
    rebuilt = build_assignments(parse_config(base_config))
    assert written.equals(rebuilt)
    assert {"is_cold_user", "cohort_heavy"} <= set(written.columns)
    with pytest.raises(RunDirError, match="run_shard|prepare"):
        run_shard(base_config, 0, 3, out)  # not prepared for 3 shards


_KILLER = """
import json, os, signal, sys
import quasid.core.io as atomic_io
from simulator.replay import run_experiment

config, out = json.loads(sys.argv[1]), sys.argv[2]
real_replace = os.replace
seen = {"n": 0}

def replace(src, dst):
    # Die (SIGKILL: no cleanup) while shard 2 renames its third file into place.
    if "part-00002-of-00004" in str(dst):
        seen["n"] += 1
        if seen["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

atomic_io.os.replace = replace  # every file goes through quasid.core.io
run_experiment(config, out, n_shards=4)
"""


def test_a_killed_run_resumes_to_the_same_events(run_dir, base_config, tmp_path):
    out = tmp_path / "killed"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(base_config), str(out)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    shards = out / "_simulator" / "shards"
    done = sorted(p.name for p in shards.glob("*.json"))
    assert done == ["shard-00000-of-00004.json", "shard-00001-of-00004.json"]
    assert list((out / "events").rglob(".part-00002-of-00004.parquet.*.tmp"))  # killed mid-write
    assert not (out / "manifest.json").exists()
    before = {p: p.stat().st_mtime_ns for p in (out / "events").rglob("part-00000-*.parquet")}

    run_experiment(base_config, out, n_shards=4)
    assert events_digest(out) == events_digest(run_dir)
    assert not list((out / "events").rglob("*.tmp"))
    after = {p: p.stat().st_mtime_ns for p in (out / "events").rglob("part-00000-*.parquet")}
    assert after == before  # finished shards were skipped, not rewritten
    # a second rerun changes nothing; another shard count on this directory is refused
    run_experiment(base_config, out, n_shards=4)
    assert events_digest(out) == events_digest(run_dir)
    with pytest.raises(RunDirError, match="shard count"):
        run_experiment(base_config, out, n_shards=2)


def test_injected_effects_show_at_their_size(base_config, tmp_path):
    aa = copy.deepcopy(base_config)
    aa["arms"][1]["stack"] = "popularity"  # A/A: both arms serve the same stack
    run_experiment(aa, tmp_path / "aa", n_shards=1)
    lifted = copy.deepcopy(aa)
    lifted["effects"] = [{"arm": "treatment", "on": "click", "factor": 1.2},
                         {"arm": "treatment", "on": "order", "factor": 0.7}]
    run_experiment(lifted, tmp_path / "lifted", n_shards=1)

    def counts(path: Path, experiment: str = "exp") -> pl.DataFrame:
        return (read_events(path, experiment).group_by("arm", "event_type").len()
                .pivot("event_type", index="arm", values="len").sort("arm"))

    base, eff = counts(tmp_path / "aa"), counts(tmp_path / "lifted")
    c0, t0 = base.row(0, named=True), base.row(1, named=True)
    c1, t1 = eff.row(0, named=True), eff.row(1, named=True)
    assert c0 == c1  # control untouched, to the event
    # The same requests and random numbers: only the treatment's probabilities moved.
    # Tolerances ~3 sd of the ratios (about 1,200 clicks and 500 orders per arm here).
    assert t1["click"] / t0["click"] == pytest.approx(1.2, abs=0.1)
    conv0, conv1 = t0["order"] / t0["click"], t1["order"] / t1["click"]
    assert conv1 / conv0 == pytest.approx(0.7, abs=0.1)
    # between arms (different users): the CTR ratio is about the injected factor
    ctr_ratio = (t1["click"] / t1["impression"]) / (c1["click"] / c1["impression"])
    assert ctr_ratio == pytest.approx(1.2, abs=0.15)
    # the pre-period never carries the effect
    assert events_digest(tmp_path / "aa", "exp__pre") == events_digest(tmp_path / "lifted",
                                                                       "exp__pre")


def test_clockless_data_uses_a_virtual_clock(small_world, tmp_path, base_config):
    # Amazon-like: no cutoff in the data card, ts = position in the user's sequence.
    inter = small_world.interactions.sort("user_id", "ts", "item_id").with_columns(
        ts=pl.int_range(pl.len()).over("user_id").cast(pl.Int64))
    from quasid.data.dataset import write_dataset

    card = {**small_world.datacard, "cutoff_ts": None, "end_ts": None}
    data = write_dataset(tmp_path / "clockless", small_world.items, inter, card, small_world.world)
    config = {**copy.deepcopy(base_config), "data": {"path": str(data), "window_last": 2,
                                                     "pre_last": 1}}
    config["world"] = {"kind": "truth"}
    out = tmp_path / "run"
    manifest = run_experiment(config, out, n_shards=2)
    assert manifest["data"]["clock"] == "virtual"
    events = read_events(out, "exp")
    imp = events.filter(pl.col("event_type") == "impression")
    expected = inter.group_by("user_id").len().select(pl.col("len").clip(upper_bound=2).sum())
    assert imp["request_id"].n_unique() == expected.item()  # each user's last two interactions
    assert imp["day"].min() >= 0 and imp["day"].max() < config["days"]
    # the virtual clock keeps each user's order
    first = imp.group_by("request_id").agg(pl.col("ts").first(), pl.col("user_id").first())
    ordered = first.sort("user_id", "request_id")
    assert (ordered.group_by("user_id", maintain_order=True)
            .agg((pl.col("ts").diff().drop_nulls() >= 0).all())["ts"].all())


def test_bad_configs_are_rejected_with_clear_errors(base_config, tmp_path):
    from quasid.core.config import ConfigError

    bad = copy.deepcopy(base_config)
    bad["arms"][1]["allocation"] = 0.7
    with pytest.raises(ConfigError, match="allocations sum"):
        parse_config(bad)
    bad = copy.deepcopy(base_config)
    bad["effects"] = [{"arm": "nobody", "on": "click", "factor": 2}]
    with pytest.raises(ConfigError, match="unknown arm 'nobody'"):
        parse_config(bad)
    bad = copy.deepcopy(base_config)
    bad["days"] = 40
    with pytest.raises(ValueError, match="days=40"):
        run_experiment(bad, tmp_path / "x")
    assert not (tmp_path / "x" / "events").exists()
    bad = copy.deepcopy(base_config)
    bad["arms"][1] = {"name": "treatment", "tokenizer": "quasid", "allocation": 0.5}
    with pytest.raises(ValueError, match="tokenizer 'quasid' but no stack"):
        run_experiment(bad, tmp_path / "y")
    bad = copy.deepcopy(base_config)
    bad["cohorts"] = [{"name": "oops", "level": "item", "expr": "no_such_column > 1"}]
    with pytest.raises(ValueError, match="cohort 'oops'"):
        run_experiment(bad, tmp_path / "z")


def test_stacks_handed_in_override_the_config(base_config, tmp_path, small_world):
    from simulator.baselines import RandomRecommender

    ids = small_world.items["item_id"].to_numpy()
    stacks = {"treatment": RandomRecommender(ids, seed=3)}
    out = tmp_path / "handed"
    run_experiment(base_config, out, stacks=stacks)
    # base_config's random stack is seeded by the config seed (3): the same slates
    ref = tmp_path / "ref"
    run_experiment(base_config, ref)
    assert events_digest(out) == events_digest(ref)
    with pytest.raises(ValueError, match="unknown arms"):
        run_experiment(base_config, tmp_path / "bad", stacks={"nope": stacks["treatment"]})

"""The simulator's fast paths against the straightforward versions they replaced.

Each fast path (issue 18: aggregate validation, sort-free event rows, counts from the
batch arrays, the Poisson table, draws at the needed cells only, the popularity and
catalog lookups, the background events writer) must give exactly what the slow version
gives, and a bad event must still be caught, named and never written.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import polars as pl
import pytest
from scipy.stats import poisson

from quasid.core import schemas
from quasid.core.recommender import PAD
from quasid.core.schemas import EVENTS, ContractError, validate
from simulator import replay
from simulator.baselines import PopularityRecommender
from simulator.events import (
    EVENT_NAMES,
    STAGE_DELAY,
    batch_counts,
    event_frame,
    events_digest,
    write_events,
)
from simulator.lookup import IdIndex
from simulator.replay import run_experiment, run_shard
from simulator.responses import (
    Probabilities,
    Responses,
    TrueWorld,
    poisson_quantile,
    request_keys,
    respond,
    stage_uniforms,
)
from simulator.rundir import prepare

ARMS = ["control", "treatment"]


def _batch(rng: np.random.Generator, n: int = 300, k: int = 6, shuffle: bool = False):
    """A batch of served slates with nested outcomes (order within click, cancel within order)."""
    request_ids = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    if shuffle:
        request_ids = rng.permutation(request_ids)
    requests = {"request_id": request_ids, "user_id": rng.integers(0, 50, n).astype(np.int64),
                "ts": rng.integers(0, 10**6, n).astype(np.int64),
                "day": np.full(n, 2, dtype=np.int32)}
    items = np.stack([rng.choice(100, k, replace=False) for _ in range(n)]).astype(np.int64)
    click = rng.random((n, k)) < 0.3
    order = click & (rng.random((n, k)) < 0.4)
    cancel = order & (rng.random((n, k)) < 0.3)
    quantity = np.where(order, rng.integers(1, 4, (n, k)), 0).astype(np.int32)
    price = np.round(rng.uniform(1, 80, (n, k)), 2)
    arm = rng.integers(0, 2, n)
    item_flags = {"is_cold_item": rng.random((n, k)) < 0.2, "cohort_premium": price > 40}
    user_flags = {"is_cold_user": rng.random(n) < 0.3,
                  "replicate": rng.integers(0, 2, n).astype(np.int16)}
    return (arm, requests, items, Responses(click, order, cancel, quantity), price, item_flags,
            user_flags)


def _reference_event_frame(arm, requests, items, responses, price, item_flags, user_flags):
    """The construction the fast path replaced: concatenate the rows of every stage, then
    lexsort by (request_id, position, stage)."""
    n, k = items.shape
    flat = [np.arange(n * k), np.flatnonzero(responses.click), np.flatnonzero(responses.order),
            np.flatnonzero(responses.cancel)]
    idx = np.concatenate(flat)
    stage = np.repeat(np.arange(4, dtype=np.int8), [len(f) for f in flat])
    req, pos = idx // k, idx % k
    order = np.lexsort((stage, pos, requests["request_id"][req]))
    idx, stage, req, pos = idx[order], stage[order], req[order], pos[order]
    quantity = np.where(stage >= 2, responses.quantity.ravel()[idx], 0).astype(np.int32)
    return pl.DataFrame({
        "experiment_id": ["e"] * len(idx),
        "arm": pl.Series(ARMS).gather(arm[req]),
        "user_id": requests["user_id"][req],
        "request_id": requests["request_id"][req],
        "ts": requests["ts"][req] + STAGE_DELAY[stage],
        "day": requests["day"][req],
        "item_id": items.ravel()[idx],
        "position": pos.astype(np.int16),
        "event_type": EVENT_NAMES.gather(stage),
        "quantity": quantity,
        "value": np.round(price.ravel()[idx] * quantity, 2),
        "is_cold_item": item_flags["is_cold_item"].ravel()[idx],
        "is_cold_user": user_flags["is_cold_user"][req],
        "cohort_premium": item_flags["cohort_premium"].ravel()[idx],
        "replicate": user_flags["replicate"][req],
    })


@pytest.mark.parametrize("shuffle", [False, True])
def test_event_rows_equal_the_sorted_reference(shuffle):
    rng = np.random.default_rng(1 + shuffle)
    arm, requests, items, responses, price, item_flags, user_flags = _batch(rng, shuffle=shuffle)
    frame = event_frame("e", ARMS, arm, requests, items, responses, price, item_flags, user_flags)
    reference = _reference_event_frame(arm, requests, items, responses, price, item_flags,
                                       user_flags)
    assert frame.equals(reference)
    # one impression per slot, plus one row per click, order and cancel
    assert frame.height == items.size + sum(int(a.sum()) for a in
                                            (responses.click, responses.order, responses.cancel))
    validate(frame, EVENTS, source="batch")


def test_batch_counts_equal_the_counts_of_the_rows():
    rng = np.random.default_rng(3)
    arm, requests, items, responses, price, item_flags, user_flags = _batch(rng)
    frame = event_frame("e", ARMS, arm, requests, items, responses, price, item_flags, user_flags)
    counts = batch_counts(ARMS, arm, responses, price)
    cents = (pl.col("value") * 100).round().cast(pl.Int64)
    rows = frame.group_by("arm").agg(
        requests=pl.col("request_id").n_unique(),
        impressions=(pl.col("event_type") == "impression").sum(),
        clicks=(pl.col("event_type") == "click").sum(),
        orders=(pl.col("event_type") == "order").sum(),
        cancels=(pl.col("event_type") == "cancel").sum(),
        gmv_cents=cents.filter(pl.col("event_type") == "order").sum()
        - cents.filter(pl.col("event_type") == "cancel").sum())
    expected = {r.pop("arm"): {key: int(v) for key, v in r.items()}
                for r in rows.iter_rows(named=True)}
    assert counts == expected
    assert counts["control"]["gmv_cents"] > 0 and counts["treatment"]["cancels"] > 0


def _events(n: int = 6) -> pl.DataFrame:
    rng = np.random.default_rng(4)
    arm, requests, items, responses, price, item_flags, user_flags = _batch(rng, n=n, k=3)
    return event_frame("e", ARMS, arm, requests, items, responses, price, item_flags, user_flags)


FAULTS = {
    "null user": lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(None)
                                          .otherwise(pl.col("user_id")).alias("user_id")),
    "NaN value": lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(math.nan)
                                          .otherwise(pl.col("value")).alias("value")),
    "inf value": lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(math.inf)
                                          .otherwise(pl.col("value")).alias("value")),
    "negative quantity": lambda f: f.with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(-1).otherwise(pl.col("quantity"))
        .cast(pl.Int32).alias("quantity")),
    "negative day": lambda f: f.with_columns(pl.lit(-1, dtype=pl.Int32).alias("day")),
    "unknown event type": lambda f: f.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("purchase"))
        .otherwise(pl.col("event_type")).alias("event_type")),
    "duplicate key": lambda f: pl.concat([f, f.slice(5, 1)]),
    "two faults": lambda f: FAULTS["duplicate key"](FAULTS["negative quantity"](f)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_event_gives_the_same_error_as_the_row_masks(fault, tmp_path):
    bad = FAULTS[fault](_events())
    path = tmp_path / "day=0" / "part-00000-of-00001.parquet"
    with pytest.raises(ContractError) as caught:
        write_events(bad, path)
    # the message is the one the per-row masks build (the first broken rule, its rows)
    with pytest.raises(ContractError) as reference:
        schemas._raise_first_broken_rule(bad, EVENTS, str(path))
    assert str(caught.value) == str(reference.value)
    assert str(path) in str(caught.value) and "first offending row" in str(caught.value)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []  # nothing written


def test_fault_messages_name_column_value_and_rule():
    cases = {"NaN value": ("'value'", "value=nan", "finite numbers"),
             "negative quantity": ("'quantity'", "quantity=-1", "quantity >= 0"),
             "unknown event type": ("'event_type'", "'purchase'", "one of impression"),
             "duplicate key": ("request_id+item_id+event_type", "row 5", "unique"),
             "two faults": ("'quantity'", "quantity=-1", ">= 0")}  # the column rule comes first
    for fault, fragments in cases.items():
        with pytest.raises(ContractError) as caught:
            validate(FAULTS[fault](_events()), EVENTS, source="events.parquet")
        assert all(f in str(caught.value) for f in fragments), (fault, str(caught.value))


def test_a_row_hash_collision_falls_back_to_the_exact_check(monkeypatch):
    good = _events()
    monkeypatch.setattr(schemas, "_all_rules_hold", lambda frame, schema: False)
    assert validate(good, EVENTS) is good  # "maybe broken", but no rule is: passes unchanged
    with pytest.raises(ContractError, match="unique"):
        validate(FAULTS["duplicate key"](good), EVENTS)


def test_the_aggregate_verdict_matches_the_row_masks_on_random_frames():
    rng = np.random.default_rng(5)
    for trial in range(60):
        frame = _events(n=int(rng.integers(1, 12)))
        for fault in rng.choice(list(FAULTS), size=int(rng.integers(0, 3)), replace=False):
            frame = FAULTS[fault](frame)
        try:
            schemas._raise_first_broken_rule(frame, EVENTS, "f")
            slow = None
        except ContractError as exc:
            slow = str(exc)
        assert schemas._all_rules_hold(frame, EVENTS) == (slow is None), trial


def test_a_bad_event_stops_the_shard_before_its_record(base_config, tmp_path, monkeypatch):
    out = tmp_path / "bad"
    prepare(base_config, out, 1)
    real = replay.event_frame
    state = {"day": None}

    def corrupt(exp_id, *args):
        frame = real(exp_id, *args)
        if exp_id == "exp" and int(frame["day"][0]) == 2:  # one negative quantity on day 2
            state["day"] = 2
            frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(-3)
                                       .otherwise(pl.col("quantity")).cast(pl.Int32)
                                       .alias("quantity"))
        return frame

    monkeypatch.setattr(replay, "event_frame", corrupt)
    with pytest.raises(ContractError, match=r"experiment_id=exp/day=2/.*'quantity'.*-3"):
        run_shard(base_config, 0, 1, out)
    assert state["day"] == 2
    days = sorted(int(p.name.split("=")[1]) for p in (out / "events" / "experiment_id=exp").iterdir()
                  if any(p.glob("*.parquet")))
    assert days == [0, 1]  # neither the bad day nor any later one reached the disk
    assert not list((out / "events").rglob("*.tmp"))
    assert not list((out / "_simulator" / "shards").glob("*.json"))  # no shard record
    monkeypatch.setattr(replay, "event_frame", real)
    run_shard(base_config, 0, 1, out)  # the rerun rewrites the shard whole
    assert len(list((out / "events" / "experiment_id=exp").rglob("*.parquet"))) == 10


def test_same_seed_same_bytes_whatever_the_batch_size(base_config, tmp_path):
    run_experiment(base_config, tmp_path / "a", 1)
    run_experiment(base_config, tmp_path / "b", 1)
    other = dict(base_config, batch_size=77)
    run_experiment(other, tmp_path / "c", 1)

    def files(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((root / "events").rglob("*.parquet"))}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(files(tmp_path / "a")) == 15  # 10 experiment days + 5 pre-period days
    assert events_digest(tmp_path / "c") == events_digest(tmp_path / "a")


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 4.5, 30.0])
def test_poisson_quantile_matches_scipy_and_the_definition(mu):
    rng = np.random.default_rng(6)
    u = rng.random(200_000)
    fast = poisson_quantile(u, mu)
    assert np.array_equal(fast, np.maximum(poisson.ppf(u, mu), 0).astype(np.int64))
    assert abs(fast.mean() - mu) < 5 * math.sqrt(mu / len(u))
    cdf = poisson.cdf(np.arange(int(mu + 10 * math.sqrt(mu) + 10)), mu)
    j = np.arange(len(cdf))
    keep = cdf < 1.0
    # the smallest j with F(j) >= u: exactly at F(j) it is j, one float step above it j + 1
    assert np.array_equal(poisson_quantile(cdf[keep], mu), j[keep])
    assert np.array_equal(poisson_quantile(np.nextafter(cdf[keep], 1), mu), j[keep] + 1)


def test_poisson_quantile_edge_means():
    assert poisson_quantile(np.array([0.0, 0.5, 0.999]), 0.0).tolist() == [0, 0, 0]
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="mean"):
            poisson_quantile(np.array([0.5]), bad)


class _FixedWorld:
    """A world with given probability arrays, to test the draws alone."""

    name = "fixed"
    cancel_rate = 0.25
    quantity_extra = 0.7

    def __init__(self, click, order):
        self.p = Probabilities(click, order)

    def probabilities(self, users, items):
        return self.p


def _reference_respond(world, items, request_ids, seed, click_factor, order_factor):
    """Every stage drawn on the full (n, k) grid, as before the fast path."""
    n, k = items.shape
    p = world.probabilities(None, items)
    p_click = np.minimum(1.0, p.click * np.reshape(click_factor, (-1, 1)))
    p_order = np.minimum(1.0, p.order * np.reshape(order_factor, (-1, 1)))
    keys = request_keys(seed, request_ids)
    click = stage_uniforms(keys, k, "click") < p_click
    order = click & (stage_uniforms(keys, k, "order") < p_order)
    cancel = order & (stage_uniforms(keys, k, "cancel") < world.cancel_rate)
    quantity = np.zeros((n, k), dtype=np.int32)
    u = stage_uniforms(keys, k, "quantity")[order]
    quantity[order] = 1 + np.maximum(poisson.ppf(u, world.quantity_extra), 0).astype(np.int32)
    return Responses(click, order, cancel, quantity)


def test_later_stages_drawn_at_their_cells_equal_the_full_grid():
    rng = np.random.default_rng(7)
    n, k = 4000, 8
    world = _FixedWorld(rng.uniform(0, 0.6, (n, k)), rng.uniform(0, 0.9, (n, k)))
    items = rng.integers(0, 50, (n, k))
    ids = rng.choice(10**6, n, replace=False)
    factors = [(1.0, 1.0), (1.0, np.where(rng.random(n) < 0.5, 1.5, 1.0)), (1.2, 0.5)]
    for click_factor, order_factor in factors:
        fast = respond(world, np.zeros(n, np.int64), items, ids, 9, click_factor, order_factor)
        slow = _reference_respond(world, items, ids, 9, click_factor, order_factor)
        for name in ("click", "order", "cancel", "quantity"):
            assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    # the draws follow the probabilities: click rate within 4 standard errors
    fast = respond(world, np.zeros(n, np.int64), items, ids, 9)
    expected = world.p.click.mean()
    assert abs(fast.click.mean() - expected) < 4 * math.sqrt(expected / fast.click.size)
    assert abs(fast.cancel.sum() / fast.order.sum() - 0.25) < 0.05


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def test_true_world_probabilities_equal_the_world_formulas(small_world):
    world = small_world.world
    truth = TrueWorld(world)
    rng = np.random.default_rng(8)
    users = rng.integers(0, world.n_users, 500)
    items = rng.integers(0, world.n_items, (500, 10))
    got = truth.probabilities(users, items)
    u = np.broadcast_to(users[:, None], items.shape)
    a = world.affinity(u, items)
    click = world.position_bias[:10][None, :] * _sigmoid(a + world.click_bias)
    order = _sigmoid(world.order_bias + world.order_slope * a + world.price_utility(u, items))
    assert np.array_equal(got.click, click) and np.array_equal(got.order, order)


def _reference_popularity(stack: PopularityRecommender, histories, k):
    """Look each history item up among the top m, then a stable sort of the seen marks."""
    m = min(len(stack.ranked), k + histories.shape[1])
    top = stack.ranked[:m]
    seen = (top[None, :, None] == histories[:, None, :]).any(axis=2)
    pick = np.argsort(seen, axis=1, kind="stable")[:, :k]
    return top[pick], stack.scores[:m][pick]


@pytest.mark.parametrize("n_items, id_scale", [(40, 1), (500, 1), (60, 10**12)])
def test_popularity_fast_path_equals_the_stable_sort(n_items, id_scale):
    rng = np.random.default_rng(n_items)
    catalog = rng.permutation(n_items).astype(np.int64) * id_scale  # huge ids: binary search
    stack = PopularityRecommender.fit(catalog, rng.choice(catalog[: n_items // 2], 3000))
    histories = rng.choice(catalog, (700, 12))
    histories[rng.random(histories.shape) < 0.3] = PAD
    histories[rng.random(histories.shape) < 0.05] = -7  # neither PAD nor an item
    histories[:50, :6] = histories[:50, 6:]  # repeated items in one history
    histories[50:60] = stack.ranked[:12]  # a history made of the most popular items
    for k in (1, 5, 10):
        got = stack.recommend(histories, k)
        want = _reference_popularity(stack, histories, k)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert all(len(set(row)) == k for row in got[0].tolist())


@pytest.mark.parametrize("scale", [1, 3, 10**15])
def test_id_index_dense_and_sparse_paths_agree_with_a_dict(scale):
    rng = np.random.default_rng(scale % 97)
    ids = rng.choice(5000, 800, replace=False).astype(np.int64) * scale
    index = IdIndex(ids)
    assert (index._table is not None) == (scale < 10**6)
    query = np.concatenate([rng.choice(ids, 300), [PAD, -12, ids.max() + 1, 10**17, 0]])
    where = {int(v): i for i, v in enumerate(ids)}
    expected = np.array([where.get(int(q), -1) for q in query])
    assert np.array_equal(index.positions(query), expected)
    assert index.positions(query.reshape(-1, 5)).shape == (len(query) // 5, 5)

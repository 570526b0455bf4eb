"""Popularity and random stacks, request histories, cohorts and per-request randomness."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from quasid.core.recommender import PAD, Recommender
from simulator.arms import StackContext, arm_recommender, register_stack
from simulator.baselines import PopularityRecommender, RandomRecommender
from simulator.config import ArmSpec
from simulator.responses import request_keys, stage_uniforms
from simulator.traffic import Logs


def test_popularity_ranks_by_training_counts_and_skips_history():
    stack = PopularityRecommender.fit(np.arange(6), np.array([5, 5, 5, 2, 2, 0, 4]))
    assert isinstance(stack, Recommender)
    hist = np.array([[PAD, PAD, PAD], [PAD, 5, 2], [0, 1, 3]])
    items, scores = stack.recommend(hist, 3)
    # counts: 5 -> 3, 2 -> 2, 0 -> 1, 4 -> 1 (tie broken by id), others 0
    assert items.tolist() == [[5, 2, 0], [0, 4, 1], [5, 2, 4]]
    assert (np.diff(scores, axis=1) <= 0).all()
    # a catalog smaller than history + k still yields k distinct items
    items, _ = stack.recommend(np.array([[0, 1, 2, 3, 4]]), 3)
    assert len(set(items[0].tolist())) == 3


def test_random_stack_is_keyed_on_the_request_not_the_batch():
    stack = RandomRecommender(np.arange(100, 400), seed=5)
    rng = np.random.default_rng(0)
    hist = rng.integers(100, 400, (300, 20))
    users = np.arange(300)
    items, scores = stack.recommend(hist, 10, users)
    assert ((items >= 100) & (items < 400)).all()
    assert all(len(set(r)) == 10 for r in items.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()
    alone, _ = stack.recommend(hist[7:8], 10, users[7:8])
    assert alone.tolist() == items[7:8].tolist()
    perm = rng.permutation(300)
    shuffled, _ = stack.recommend(hist[perm], 10, users[perm])
    assert np.array_equal(shuffled, items[perm])
    # uniform over the catalog: each item is shown about 300 * 10 / 300 = 10 times
    counts = np.bincount(items.ravel() - 100, minlength=300)
    assert counts.min() >= 1 and counts.max() < 30
    other, _ = RandomRecommender(np.arange(100, 400), seed=6).recommend(hist, 10, users)
    assert (other != items).mean() > 0.9


def history_before(interactions: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Reference (polars, independent of the gather): each interaction with the user's previous
    `max_len` items as a list column `history`.

    The request a logged interaction becomes: what the user had done before it, oldest
    first. Vectorized with a rolling window over each user's sorted rows.
    """
    ordered = interactions.sort(["user_id", "ts", "item_id"])
    shifted = [pl.col("item_id").shift(k).over("user_id") for k in range(max_len, 0, -1)]
    return ordered.with_columns(
        pl.concat_list(shifted).list.drop_nulls().alias("history")
    )


def test_histories_match_history_before(small_world):
    inter = small_world.interactions
    logs = Logs.from_interactions(inter)
    reference = history_before(inter.select("user_id", "item_id", "ts"), 5)
    rows = np.arange(len(logs))
    mine = logs.histories(rows, 5)
    for row in np.random.default_rng(1).choice(len(logs), 300, replace=False):
        expected = reference["history"][int(row)].to_list()
        got = [x for x in mine[row].tolist() if x != PAD]
        assert got == expected
        assert mine[row].tolist()[: 5 - len(expected)] == [PAD] * (5 - len(expected))


def test_uniforms_are_a_function_of_seed_request_and_position():
    ids = np.arange(1000)
    u = stage_uniforms(request_keys(1, ids), 10, "click")
    again = stage_uniforms(request_keys(1, ids[::-1]), 10, "click")[::-1]
    assert np.array_equal(u, again)
    assert abs(u.mean() - 0.5) < 0.01 and 0 <= u.min() and u.max() < 1
    other_stage = stage_uniforms(request_keys(1, ids), 10, "order")
    assert abs(np.corrcoef(u.ravel(), other_stage.ravel())[0, 1]) < 0.03
    assert not np.array_equal(u, stage_uniforms(request_keys(2, ids), 10, "click"))


def test_registered_stacks_are_the_flows_hook():
    seen = {}

    def factory(ctx: StackContext) -> Recommender:
        seen["ctx"] = ctx
        return PopularityRecommender(ctx.catalog, np.ones(len(ctx.catalog)), name="custom")

    register_stack("custom-test", factory)
    ctx = StackContext(np.arange(10), np.arange(3), seed=1, arm="t", options={"x": 1})
    stack = arm_recommender(ArmSpec(name="t", stack="custom-test", allocation=0.5), ctx)
    assert stack.name == "custom" and seen["ctx"].options == {"x": 1}
    with pytest.raises(FileNotFoundError, match="not a registered stack name"):
        arm_recommender(ArmSpec(name="t", stack="/no/such/stack", allocation=0.5), ctx)

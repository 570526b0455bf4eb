"""The first-order transition baseline (`quasid.stack.transitions`) against hand counts."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from quasid.core.recommender import PAD, Recommender
from quasid.core.slates import first_unique, row_isin
from quasid.data.sequences import row_mapper
from quasid.stack.transitions import FollowerTable, TransitionRecommender, follower_counts


def _logs(seqs: dict[int, list[int]]) -> pl.DataFrame:
    return pl.DataFrame([{"user_id": u, "item_id": i, "ts": t}
                         for u, s in seqs.items() for t, i in enumerate(s)])


# transitions: 1->2 x3, 2->3 x2, 2->4 x1, 3->5 x1, 5->1 x1; counts: 1:3, 2:3, 3:2, 5:2, 4:1
LOGS = _logs({1: [1, 2, 3], 2: [1, 2, 4], 3: [5, 1, 2, 3, 5]})


def test_followers_are_counted_in_order_with_their_shares():
    model = TransitionRecommender.fit(LOGS, successors=2, backoff=2)
    assert isinstance(model, Recommender)
    assert model.sources.tolist() == [1, 2, 3, 5]
    assert model.followers.tolist() == [[2, PAD], [3, 4], [5, PAD], [1, PAD]]
    assert model.shares[1].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert model.popular.tolist() == [1, 2, 3, 5, 4]  # ties by id


def test_slates_back_off_through_the_history_then_popularity():
    model = TransitionRecommender.fit(LOGS, successors=2, backoff=2)
    hist = np.array([[PAD, PAD, 1],  # followers of 1: 2; then popular 3, 5, 4 (1 is seen)
                     [PAD, 3, 2],    # followers of 2: 3 (seen), 4; of 3: 5; then popular 1
                     [PAD, PAD, 9],  # an unknown item: popularity alone
                     [PAD, PAD, PAD]])
    items, scores = model.recommend(hist, 3)
    assert items.tolist() == [[2, 3, 5], [4, 5, 1], [1, 2, 3], [1, 2, 3]]
    # level 0 of backoff 2: 2 + share; level 1: 1 + share; popularity: its share
    assert scores[0].tolist() == pytest.approx([2 + 1.0, 2 / 11, 2 / 11])
    assert scores[1].tolist() == pytest.approx([2 + 1 / 3, 1 + 1.0, 3 / 11])
    assert (np.diff(scores, axis=1) <= 0).all()  # slate order = descending score
    assert all(len(set(row)) == 3 for row in items.tolist())
    with pytest.raises(ValueError, match="slate size k=6"):
        model.recommend(hist, 6)


def test_the_helpers_mark_history_items_and_keep_first_valid_copies():
    cand = np.array([[4, 2, 4, 7, 2], [1, 1, 3, 5, 6]])
    hist = np.array([[PAD, 2], [6, 5]])
    seen = row_isin(cand, hist, PAD)
    assert seen.tolist() == [[False, True, False, False, True], [False] * 3 + [True, True]]
    assert first_unique(cand, 3, ~seen).tolist() == [[0, 3, -1], [0, 2, -1]]
    assert first_unique(cand, 2).tolist() == [[0, 1], [0, 2]]


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ts'\]"):
        TransitionRecommender.fit(LOGS.drop("ts"))
    with pytest.raises(ValueError, match="successors must be >= 1, got 0"):
        TransitionRecommender.fit(LOGS, successors=0)
    with pytest.raises(ValueError, match="backoff must be >= 1, got 0"):
        TransitionRecommender.fit(LOGS, backoff=0)
    with pytest.raises(ValueError, match="no training interactions"):
        TransitionRecommender.fit(LOGS.head(0))


def test_the_offline_benchmark_scores_it_as_a_direct_computation_does(tiny_world, tmp_path):
    from quasid.data.dataset import load_dataset
    from quasid.data.sequences import loo_requests
    from quasid.data.splits import leave_one_out
    from quasid.evaluation.offline import TRANSITION, TRANSITION_HISTORY, offline_eval
    from quasid.stack.metrics import hit_ndcg

    assert TRANSITION == "transition"
    out = tmp_path / "out"
    res = offline_eval(tiny_world, ["transition"], 2, out, progress=False)
    runs = [json.loads((out / "runs" / "transition" / f"seed{s}" / "metrics.json").read_text())
            for s in range(2)]
    assert runs[0]["settings"] == {"data": str(tiny_world), "tokenizer": "transition",
                                   "seed": 0, "split": "test"}
    assert runs[0]["stack"] == runs[1]["stack"] == runs[0]["retrieval"]  # deterministic
    row = next(r for r in res["rows"] if r["segment"] == "all")
    assert row["hr@10_std"] == 0.0
    # the same protocol by hand: fit on the training part (cold items dropped), each
    # user's last item as the target, the full item set
    ds = load_dataset(tiny_world)
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    model = TransitionRecommender.fit(leave_one_out(ds.interactions, cold_items=cold).train)
    hist, targets = loo_requests(ds.interactions, TRANSITION_HISTORY)
    per = hit_ndcg(model.recommend(hist, 10)[0], targets)
    assert math.isclose(runs[0]["stack"]["all"]["hr@10"], per["hr@10"].mean())
    assert math.isclose(runs[0]["stack"]["all"]["ndcg@10"], per["ndcg@10"].mean())
    assert runs[0]["stack"]["cold"]["hr@10"] == 0.0  # a cold item is never counted
    assert per["hr@10"].mean() > 0.05  # the synthetic world's sessions have transitions


def test_a_history_of_nearly_every_item_fills_the_slate_with_seen_items_last():
    model = TransitionRecommender.fit(LOGS, successors=2, backoff=2)  # 5 training items
    items, scores = model.recommend(np.array([[1, 3, 5, 2]]), 3)
    # unseen: 4 (a follower of 2); then the seen ones by candidate order, scored -1
    assert items.tolist() == [[4, 3, 1]]
    assert scores[0].tolist() == pytest.approx([2 + 1 / 3, -1.0, -1.0])


def test_logs_without_transitions_serve_popularity_alone():
    model = TransitionRecommender.fit(_logs({1: [3], 2: [3], 3: [5], 4: [7]}))
    assert model.sources.tolist() == [] and model.popular.tolist() == [3, 5, 7]
    items, scores = model.recommend(np.array([[PAD, 5], [PAD, PAD]]), 2)
    assert items.tolist() == [[3, 7], [3, 5]]
    assert scores[1].tolist() == pytest.approx([0.5, 0.25])


def _table(logs: pl.DataFrame, successors: int = 50, backoff: int = 2) -> FollowerTable:
    # item ids 1..5 are rows 0..4
    rows_of = row_mapper(np.arange(1, 6), "test")
    popularity = np.bincount(rows_of(logs["item_id"].to_numpy()), minlength=5)
    return FollowerTable.from_interactions(logs, rows_of, popularity, successors,
                                           backoff=backoff, decay=0.5, prior_weight=1.0)


def test_follower_counts_keep_the_totals_of_truncated_sources():
    sources, followers, counts, totals = follower_counts(LOGS, successors=1)
    assert sources.tolist() == [1, 2, 3, 5]
    assert followers.tolist() == [[2], [3], [5], [1]]
    assert counts.tolist() == [[3], [2], [1], [1]]
    assert totals.tolist() == [3, 3, 1, 1]  # 2 -> 4 is cut from the table, not from N(2)


def test_transition_probability_of_the_stack_against_hand_counts():
    table = _table(LOGS)
    rows = torch.tensor([[PAD, 2, 1]])  # items 3 then 2 (newest): weights 1 (item 2), 0.5 (item 3)
    req = table.request(rows)
    # followers: of 2: 3 x2, 4 x1 (N = 3); of 3: 5 x1 (N = 1); popularity 3,3,2,1,2 of 11,
    # add-one smoothed over 5 items: q = (4, 4, 3, 2, 3) / 16; norm = 3 + 0.5 * 1 + 1 = 4.5
    q = np.array([4, 4, 3, 2, 3]) / 16
    expected = (np.array([0, 0, 2, 1, 0.5]) + q) / 4.5
    got = req.log_p(torch.arange(5)[None]).exp()[0].numpy()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got.sum() == pytest.approx(1.0, rel=1e-6)  # a distribution when nothing is cut
    assert req.log_p_all(5).exp()[0].numpy() == pytest.approx(expected, rel=1e-6)
    assert req.top(5).tolist() == [[2, 3, 4, PAD, PAD]]  # items 3, 4, 5 by weighted count
    cut = _table(LOGS, successors=1).request(rows).log_p(torch.arange(5)[None]).exp()[0].numpy()
    assert cut.sum() == pytest.approx(1 - 1 / 4.5, rel=1e-6)  # 2 -> 4 counts 0, N(2) still 3


def test_followers_of_several_history_items_add_up_and_rank_across_levels():
    table = _table(pl.concat([LOGS, _logs({4: [3, 4]})]))
    # item 2 (newest): 3 x2, 4 x1; item 3 (weight 0.5): 5 x1, 4 x1 -> 4 counts 1 + 0.5
    req = table.request(torch.tensor([[2, 1], [PAD, 0], [PAD, PAD]]))
    counted = req.counted(torch.tensor([[2, 3, 4, PAD], [1, 0, 4, 2], [0, 1, 2, 3]])).tolist()
    assert counted == [[2.0, 1.5, 0.5, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert req.top(2).tolist() == [[2, 3], [1, PAD], [PAD, PAD]]
    # an empty history: only the prior, which sums to 1 over the catalog
    assert req.log_p(torch.arange(5).expand(3, -1)).exp()[2].sum().item() == pytest.approx(1.0)


def test_every_items_log_p_by_scatter_equals_the_searched_one():
    table = _table(pl.concat([LOGS, _logs({4: [3, 4, 2, 4]})]), backoff=3)
    rows = torch.tensor([[2, 1, 0], [PAD, 4, 1], [PAD, PAD, PAD], [3, 3, 3]])
    req = table.request(rows)
    dense = req.log_p_all(5)
    assert dense.shape == (4, 5) and torch.isfinite(dense).all()
    assert torch.allclose(dense, req.log_p(torch.arange(5).expand(4, -1)), atol=1e-6)


def test_follower_table_round_trips_and_refuses_bad_settings():
    table = _table(LOGS)
    back = FollowerTable.from_state_dict(table.state_dict())
    rows = torch.tensor([[PAD, 2, 1], [0, 4, 3]])
    cand = torch.arange(5).expand(2, -1)
    assert torch.equal(back.request(rows).log_p(cand), table.request(rows).log_p(cand))
    assert (back.backoff, back.decay, back.prior_weight) == (2, 0.5, 1.0)
    with pytest.raises(ValueError, match="decay"):
        FollowerTable(table.followers, table.counts, table.totals, table.prior, decay=0.0)

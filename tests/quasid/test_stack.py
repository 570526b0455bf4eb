"""The SID stack: the Recommender contract, candidates, save/load, build_stack and its errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from quasid.core.layout import STACK_FILE, SUMMARY_FILE
from quasid.core.recommender import PAD, Recommender
from quasid.core.schemas import SID_TABLE, ContractError, write_parquet
from quasid.data.sequences import (
    drop_last,
    loo_requests,
    row_mapper,
    sequence_windows,
    training_windows,
)
from quasid.data.splits import leave_one_out
from quasid.stack.build import build_stack, train_stack
from quasid.stack.config import stack_config
from quasid.stack.serving import Stack
from tests.quasid.sid_testing import kmeans_sid_table, one_thread  # noqa: F401 (fixture)

TINY = {"retriever": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "epochs": 1,
                      "batch_size": 256, "max_history": 8, "beam": 10},
        "ranker": {"d_model": 16, "n_heads": 2, "n_layers": 1, "epochs": 1, "batch_size": 256,
                   "negatives": 8, "max_history": 8},
        "candidates": 25, "weight_grid": [0.0, 1.0]}


@pytest.fixture(scope="module")
def sids(small_world):
    return kmeans_sid_table(small_world.content(), small_world.items["item_id"].to_numpy(), 2, 8)


@pytest.fixture(scope="module")
def stack(small_world, sids):
    ds = small_world
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    train = leave_one_out(ds.interactions, cold_items=cold).train
    valid = loo_requests(drop_last(ds.interactions), 8)
    built, summary = train_stack(ds.items, sids, train, stack_config(TINY), seed=0, valid=valid)
    fit = summary["weight_fit_ndcg@10"]
    pairs = [(f["retrieval_weight"], f["transition_weight"]) for f in fit]
    # every retrieval weight with every transition weight, and the best pair is kept
    assert pairs == [(w, t) for w in (0.0, 1.0) for t in built.cfg.transitions.weight_grid]
    best = max(fit, key=lambda f: f["ndcg@10"])
    assert (summary["retrieval_weight"], summary["transition_weight"]) == pairs[fit.index(best)]
    assert (built.cfg.retrieval_weight, built.cfg.transitions.weight) == pairs[fit.index(best)]
    return built


@pytest.fixture(scope="module")
def requests(small_world):
    hist, _ = loo_requests(small_world.interactions, 8)
    return hist[:300]


def test_sequence_windows_against_a_hand_example():
    log = pl.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 11, 12, 20, 21],
                        "ts": [3, 1, 2, 5, 6], "event": ["x"] * 5})
    hist, items, users, last = sequence_windows(log, max_len=2)
    # user 1 in time order: 11, 12, 10
    assert items.tolist() == [11, 12, 10, 20, 21]
    assert hist.tolist() == [[PAD, PAD], [PAD, 11], [11, 12], [PAD, PAD], [PAD, 20]]
    assert users.tolist() == [1, 1, 1, 2, 2] and last.tolist() == [False, False, True, False, True]
    rows_of = row_mapper(np.array([10, 11, 12, 20, 21]), "log")
    h, t = training_windows(log, rows_of, max_len=2)
    assert h.tolist() == [[PAD, 1], [1, 2], [PAD, 3]] and t.tolist() == [2, 0, 4]


def test_stack_is_a_recommender_and_slates_are_valid(stack, requests, small_world):
    assert isinstance(stack, Recommender)
    items, scores = stack.recommend(requests, 10)
    assert items.shape == scores.shape == (len(requests), 10)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert np.isin(items, small_world.items["item_id"].to_numpy()).all()
    assert all(len(set(row)) == 10 for row in items.tolist())  # no repeats within a slate
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # slate order = score order
    assert ((scores > 0) & (scores < 1)).all()  # price_alpha = 0: a probability


@pytest.mark.parametrize("cap", [0, 4])
def test_candidates_are_beam_then_cold_quota_then_popular_without_repeats(stack, requests, cap):
    saved = stack.cfg.cold_candidates
    stack.set_config(cold_candidates=cap)
    try:
        hist = torch.as_tensor(stack.rows_of(requests[:50]))
        beam, _ = stack.retriever.beam_search(hist, stack.cfg.retriever.beam)
        cand = stack._candidates(hist, beam)
    finally:
        stack.set_config(cold_candidates=saved)
    assert cand.shape == (50, stack.cfg.candidates)
    assert torch.equal(cand[:, : beam.shape[1]], beam)  # the beam is full on this catalog
    warm = stack.ranker.warm.numpy()
    first_level = stack.retriever.trie.codes[:, 0].numpy()
    popular = stack._popular.tolist()
    n_cold = []
    for row, b in zip(cand.tolist(), beam.tolist()):
        assert len(set(row)) == len(row) and -1 not in row
        rest = row[len(b):]
        cold = [r for r in rest if not warm[r]]
        assert rest[: len(cold)] == cold  # the quota comes right after the beam
        assert len(cold) <= cap
        assert set(first_level[cold]) <= set(first_level[b])  # under a beam result's prefix
        fill = rest[len(cold):]
        # then the most popular items not proposed yet, in popularity order
        assert fill == [p for p in popular if p not in b and p not in cold][: len(fill)]
        n_cold.append(len(cold))
    assert (max(n_cold) == cap) if cap else max(n_cold) == 0  # the quota is used


def test_the_histories_followers_join_after_the_cold_quota_best_first(stack, requests):
    hist = torch.as_tensor(stack.rows_of(requests[:50]))
    beam, _ = stack.retriever.beam_search(hist, stack.cfg.retriever.beam)
    followers = stack.transitions.request(hist)
    m = stack.cfg.transitions.candidates
    top = followers.top(m).tolist()
    cand = stack._candidates(hist, beam, followers)
    plain = stack._candidates(hist, beam)
    warm = stack.ranker.warm.numpy()
    joined = 0
    for row, base, b, best in zip(cand.tolist(), plain.tolist(), beam.tolist(), top):
        cold = [r for r in base[len(b):] if not warm[r]]
        head = len(b) + len(cold)
        assert row[:head] == base[:head]  # the beam and the cold quota come first, unchanged
        new = [f for f in best if f >= 0 and f not in row[:head]]
        assert row[head: head + len(new)] == new[: len(row) - head]  # then the followers
        joined += len(new)
    assert joined > 0


def test_a_large_transition_weight_ranks_by_transition_probability(stack, requests):
    saved = {"retrieval_weight": stack.cfg.retrieval_weight, "cold_slots": stack.cfg.cold_slots,
             "transitions": stack.cfg.transitions.model_dump()}
    stack.set_config(retrieval_weight=0.0, cold_slots=0, transitions={"weight": 1000.0})
    try:
        hist = torch.as_tensor(stack.rows_of(requests[:100]))
        _, cand, logit, _, log_t = stack._score_parts(hist)
        items, _ = stack.recommend(requests[:100], 10)
    finally:
        stack.set_config(**saved)
    slate_rows = stack.rows_of(items)
    for r, row in enumerate(slate_rows):
        by_row = dict(zip(cand[r].tolist(), log_t[r].tolist()))
        got = np.array([by_row[x] for x in row])
        # the ranker's logits move a score by |logit| / 1000 of a log p_T unit at most
        spread = float(logit[r].abs().max()) / 1000 * 2 + 1e-6
        assert (np.diff(got) <= spread).all()
        valid = cand[r] >= 0
        assert got[0] >= float(log_t[r][valid].max()) - spread


def test_exclude_history_keeps_history_items_out_of_the_slate(stack, requests):
    stack.set_config(exclude_history=True)
    try:
        items, _ = stack.recommend(requests, 10)
    finally:
        stack.set_config(exclude_history=False)
    for slate, hist in zip(items.tolist(), requests.tolist()):
        assert not set(slate) & set(hist)


def test_save_load_round_trip_gives_identical_slates(stack, requests, tmp_path):
    items, scores = stack.recommend(requests, 10)
    stack.save(tmp_path / "s.pt")
    loaded = Stack.load(tmp_path / "s.pt")
    items2, scores2 = loaded.recommend(requests, 10)
    assert np.array_equal(items, items2) and np.array_equal(scores, scores2)
    assert loaded.cfg == stack.cfg and loaded.name == stack.name
    # a stack saved before follower tables existed loads without one: no transition term
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    del state["transitions"]
    torch.save(state, tmp_path / "old.pt")
    old = Stack.load(tmp_path / "old.pt")
    assert old.transitions is None
    stack.transitions, kept = None, stack.transitions
    try:
        assert np.array_equal(old.recommend(requests, 10)[0], stack.recommend(requests, 10)[0])
    finally:
        stack.transitions = kept


def test_bad_requests_are_refused_with_a_clear_error(stack, requests):
    bad = requests[:3].copy()
    bad[1, -1] = 10**9
    with pytest.raises(ValueError, match="1000000000"):
        stack.recommend(bad, 10)
    with pytest.raises(ValueError, match="candidates"):
        stack.recommend(requests[:3], stack.cfg.candidates + 1)
    with pytest.raises(ValueError, match="overrides.retriever: unknown key 'layers'"):
        stack_config({"retriever": {"layers": 3}})


def test_build_stack_writes_both_files_and_refuses_an_incomplete_sid_table(
        small_world_dir, small_world, sids, tmp_path):
    sids_path = write_parquet(sids, tmp_path / "sids.parquet", SID_TABLE)
    path = build_stack(small_world_dir, sids_path, tmp_path / "stack", overrides=TINY, seed=1)
    assert path == tmp_path / "stack" / STACK_FILE
    summary = json.loads((tmp_path / "stack" / SUMMARY_FILE).read_text())
    # the synthetic world has a cutoff: the stack trains on what came before it
    before = small_world.interactions.filter(pl.col("ts") < small_world.datacard["cutoff_ts"])
    assert summary["counts"]["train_interactions"] == before.height
    assert summary["weight_fit_ndcg@10"] is None  # no leave-one-out validation with a cutoff
    items, _ = Stack.load(path).recommend(loo_requests(small_world.interactions, 8)[0][:5], 5)
    assert items.shape == (5, 5)

    partial = write_parquet(sids.head(100), tmp_path / "partial.parquet", SID_TABLE)
    with pytest.raises(ContractError, match="partial.parquet.*does not cover the catalog"):
        build_stack(small_world_dir, partial, tmp_path / "stack2", overrides=TINY)
    assert not (tmp_path / "stack2").exists()


def test_cold_slots_keep_the_best_cold_candidates_in_the_slate(stack, requests):
    warm = stack.ranker.warm.numpy()
    ids = stack.item_ids
    saved = {"cold_candidates": stack.cfg.cold_candidates, "cold_slots": stack.cfg.cold_slots}
    stack.set_config(cold_candidates=6, cold_slots=2)
    try:
        hist = torch.as_tensor(stack.rows_of(requests[:80]))
        _, cand, logit, log_p, log_t = stack._score_parts(hist)
        score = stack._combine(cand, logit, log_p, log_t,
                               (stack.cfg.retrieval_weight, stack.cfg.transitions.weight))
        items, scores = stack.recommend(requests[:80], 10)
    finally:
        stack.set_config(**saved)
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # still in score order
    for row, c, s in zip(items.tolist(), cand.numpy(), score.numpy()):
        valid = c >= 0
        by_id = dict(zip(ids[c[valid]].tolist(), s[valid].tolist()))
        cold_scores = sorted((by_id[i] for i in by_id if not warm[stack.rows_of([i])[0]]), reverse=True)
        in_slate = sorted((by_id[i] for i in row if not warm[stack.rows_of([i])[0]]), reverse=True)
        # the two best cold candidates (by score; equal scores are interchangeable) made it
        assert in_slate[:2] == cold_scores[:2]
        # and the other places hold the best remaining candidates
        reserved = cold_scores[:2]
        rest_all = sorted(by_id.values(), reverse=True)
        rest_slate = sorted((by_id[i] for i in row), reverse=True)
        for value in reserved:
            rest_all.remove(value)
            rest_slate.remove(value)
        assert rest_slate == rest_all[: len(rest_slate)]
    assert sum(len(set(r) & set(ids[~warm])) for r in items.tolist()) > 0


def test_cold_bias_is_fitted_on_validation_and_cold_items_reach_the_beam(stack, small_world):
    from quasid.stack.metrics import hit_ndcg

    hist, targets = loo_requests(drop_last(small_world.interactions), 8)
    hist, targets = hist[:400], targets[:400]
    saved = stack.cfg.cold_bias
    try:
        found = stack.fit_cold_bias(hist, targets)
        grid = stack.cfg.cold_bias_grid
        assert set(found) == set(grid)
        best = max(grid, key=lambda b: (found[b]["ndcg@10"], -abs(b)))
        assert stack.cfg.cold_bias == best
        stack.set_config(cold_bias=grid[0])  # one grid point's figure, recomputed directly
        slate, _, _ = stack.slates(hist, 10)
        direct = hit_ndcg(slate, targets, ks=(10,))["ndcg@10"].mean()
        assert found[grid[0]]["ndcg@10"] == pytest.approx(direct)

        warm = stack.ranker.warm.numpy()
        rows = torch.as_tensor(stack.rows_of(hist[:100]))
        searched = stack.retriever.beam_search(rows, stack.cfg.retriever.beam)[0].numpy()
        stack.set_config(cold_in_beam=False)  # the retrieval stage is the beam search itself
        assert np.array_equal(stack.rows_of(stack.slates(hist[:100], 10)[2]), searched)
        stack.set_config(cold_in_beam=True, cold_bias=20.0)  # a large bias: mostly cold items
        beam_rows, cand, _, log_p, _ = stack._score_parts(rows)
        beam_rows, cand, log_p = beam_rows.numpy(), cand.numpy(), log_p.numpy()
        assert (~warm[beam_rows[beam_rows >= 0]]).mean() > 0.5
        for r in range(100):  # the merged list: beam results or cold quota items, by log p
            got = beam_rows[r][beam_rows[r] >= 0]
            assert set(got) <= set(searched[r]) | set(cand[r][(cand[r] >= 0) & ~warm[cand[r]]])
            by_row = dict(zip(cand[r].tolist(), log_p[r].tolist()))
            assert all(by_row[a] >= by_row[b] - 1e-6 for a, b in zip(got[:-1], got[1:]))
    finally:
        stack.set_config(cold_bias=saved, cold_in_beam=True)


@pytest.mark.parametrize("changes", [{"cold_candidates": 8}, {"cold_candidates": 8, "cold_prefix": 2},
                                     {"cold_candidates": 0}])
def test_candidate_log_p_is_the_teacher_forced_log_p_of_every_candidate(stack, requests, changes):
    # serving reuses the beam's scores and the first level's distribution and decodes only
    # the other candidates: the numbers must be the full teacher-forced ones
    saved = {k: getattr(stack.cfg, k) for k in changes}
    stack.set_config(**changes)
    try:
        hist = torch.as_tensor(stack.rows_of(requests[:120]))
        with torch.inference_mode():
            encoded = stack.retriever.encode(hist)
            start = stack.retriever.decoder_start(*encoded)
            beam, beam_score = stack.retriever.beam_search(hist, stack.cfg.retriever.beam,
                                                           start=start)
            cand = stack._candidates(hist, beam)
            log_p, prefix = stack._retriever_log_p(cand, beam, beam_score, start)
            levels = stack.retriever.level_scores(hist, cand.clamp(min=0), encoded)
        valid = cand >= 0
        warm = stack.ranker.warm[cand.clamp(min=0)]
        quota = stack.cfg.cold_candidates > 0
        full = valid & (warm | (not quota))
        assert torch.allclose(log_p[full], levels.sum(-1)[full], atol=1e-5)
        if quota:
            cold = valid & ~warm
            assert cold.any()
            expected = levels[..., : stack.cfg.cold_prefix].sum(-1)
            assert torch.allclose(prefix[cold], expected[cold], atol=1e-5)
        else:
            assert prefix is None
        in_beam = (cand[:, :, None] == beam[:, None, :]).any(-1) & valid
        assert in_beam.any() and (valid & ~in_beam & warm).any()  # both paths were taken
    finally:
        stack.set_config(**saved)

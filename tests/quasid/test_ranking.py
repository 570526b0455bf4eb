"""The SID ranker: it learns (beats a random ranker), cold items use SID tokens only, and
the GMV-aware score is p(order) * price ** alpha."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from quasid.data.sequences import loo_requests, row_mapper, training_windows
from quasid.data.splits import leave_one_out
from quasid.stack.config import RankerConfig
from quasid.stack.metrics import hit_ndcg
from quasid.stack.ranker import Ranker, gmv_score, log_gmv_score, train_ranker
from quasid.stack.trie import full_codes
from tests.quasid.sid_testing import kmeans_sid_table, one_thread  # noqa: F401 (fixture)

TINY = RankerConfig(d_model=32, n_heads=2, n_layers=1, epochs=4, batch_size=128, negatives=16,
                    lr=5e-3, max_history=10)


def _train_part(ds):
    """(item ids, codes, row mapper, leave-one-out train part without cold items, warm mask)."""
    ids, codes = full_codes(kmeans_sid_table(ds.content(), ds.items["item_id"].to_numpy(), 2, 8))
    rows_of = row_mapper(ids, "test")
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    train = leave_one_out(ds.interactions, cold_items=cold).train
    warm = np.bincount(rows_of(train["item_id"].to_numpy()), minlength=len(ids)) > 0
    return ids, codes, rows_of, train, warm


@pytest.fixture(scope="module")
def trained(small_world):
    """A ranker trained on the small world's leave-one-out train part (cold items dropped)."""
    ds = small_world
    ids, codes, rows_of, train, warm = _train_part(ds)
    torch.manual_seed(0)
    model = Ranker(codes[:, :-1], warm, TINY)
    hist, tgt = training_windows(train, rows_of, TINY.max_history)
    losses = train_ranker(model, hist, tgt, np.flatnonzero(warm), seed=0).losses
    return model, rows_of, losses


def test_tiny_training_beats_a_random_ranker(trained, small_world):
    model, rows_of, losses = trained
    assert losses[-1] < losses[0]
    hist, targets = loo_requests(small_world.interactions, TINY.max_history)
    n_items = small_world.items.height
    with torch.no_grad():
        everything = torch.arange(n_items).expand(len(hist), -1)
        logits = model.logits(torch.as_tensor(rows_of(hist)), everything)
    top = logits.topk(10, dim=1).indices.numpy()
    hr = hit_ndcg(top, rows_of(targets))["hr@10"].mean()
    random_top = np.argsort(np.random.default_rng(0).random((len(hist), n_items)), axis=1)[:, :10]
    hr_random = hit_ndcg(random_top, rows_of(targets))["hr@10"].mean()
    chance = 10 / n_items  # a random ranker's expected HR@10
    sd = np.sqrt(chance * (1 - chance) / len(hist))
    assert abs(hr_random - chance) < 4 * sd  # the reference really is random
    assert hr > chance + 8 * sd and hr > 2 * hr_random, (hr, hr_random)


def test_cold_items_are_scored_from_their_sid_tokens_alone(trained):
    model, _, _ = trained
    model.eval()
    cold = torch.as_tensor(np.flatnonzero(~model.warm.numpy())[:5])
    warm = torch.as_tensor(np.flatnonzero(model.warm.numpy())[:5])
    hist = torch.full((1, 3), -1)
    hist[0, -1] = warm[0]
    cand = torch.cat([cold, warm])[None]
    with torch.no_grad():
        before = model.logits(hist, cand)
        saved = model.id_emb.weight.clone()
        model.id_emb.weight[cold] += 5.0  # a cold item's ID embedding must not matter
        after_cold = model.logits(hist, cand)
        model.id_emb.weight[warm[1:]] += 5.0  # a warm candidate's must
        after_warm = model.logits(hist, cand)
        model.id_emb.weight.copy_(saved)
    assert torch.allclose(before, after_cold)
    assert not torch.allclose(before[0, 6:], after_warm[0, 6:])


def test_gmv_score_is_p_order_times_price_to_the_alpha():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    price = torch.tensor([[10.0, 1.0, 40.0]])
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
    assert np.allclose(gmv_score(logits, price, 0.0).numpy()[0], p)
    assert np.allclose(gmv_score(logits, price, 1.0).numpy()[0], p * [10.0, 1.0, 40.0])
    assert np.allclose(gmv_score(logits, price, 0.5).numpy()[0], p * np.sqrt([10.0, 1.0, 40.0]))
    # alpha reorders: p alone favours item 1, p * price favours item 2 (0.269 * 40 > 0.881)
    assert gmv_score(logits, price, 0.0).argmax() == 1 and gmv_score(logits, price, 1.0).argmax() == 2
    # the log form keeps the order where p underflows to 0 in float32
    tiny = torch.tensor([[-120.0, -110.0]])
    assert (gmv_score(tiny, torch.ones(1, 2)) == 0).all()
    assert torch.allclose(log_gmv_score(tiny, torch.ones(1, 2)), tiny)


def test_negative_pool_must_not_be_empty():
    model = Ranker(np.array([[0, 1], [1, 0]]), np.array([False, False]), TINY)
    with pytest.raises(ValueError, match="negative_pool"):
        train_ranker(model, np.array([[0]]), np.array([1]), np.array([], dtype=np.int64))


def test_shared_negatives_loss_is_the_per_request_loss_with_the_same_negatives(trained):
    model, _, _ = trained
    model.eval()  # no ID dropout: the two forms must agree exactly
    rng = np.random.default_rng(5)
    hist = torch.as_tensor(rng.integers(-1, model.warm.shape[0], (12, TINY.max_history)))
    tgt = torch.as_tensor(rng.integers(0, model.warm.shape[0], 12))
    shared = torch.as_tensor(np.flatnonzero(model.warm.numpy())[rng.integers(0, 50, 9)])
    with torch.no_grad():
        per_request = model.loss(hist, tgt, shared.expand(12, -1))
        once = model.loss(hist, tgt, shared)
    assert torch.allclose(once, per_request, atol=1e-6)


def test_training_with_shared_negatives_learns_and_repeats_bit_for_bit(small_world):
    ds = small_world
    ids, codes, rows_of, train, warm = _train_part(ds)
    cfg = RankerConfig(**{**TINY.model_dump(), "shared_negatives": True, "negatives": 64})
    hist, tgt = training_windows(train, rows_of, cfg.max_history)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Ranker(codes[:, :-1], warm, cfg)
        losses = train_ranker(model, hist, tgt, np.flatnonzero(warm), seed=0).losses
        runs.append((losses, model.state_dict()))
    (losses, state), (losses2, state2) = runs
    assert losses == losses2 and all(torch.equal(state[k], state2[k]) for k in state)
    assert losses[-1] < losses[0]
    probe, targets = loo_requests(ds.interactions, cfg.max_history)
    with torch.no_grad():
        logits = model.logits(torch.as_tensor(rows_of(probe)),
                              torch.arange(len(ids)).expand(len(probe), -1))
    hr = hit_ndcg(logits.topk(10, dim=1).indices.numpy(), rows_of(targets))["hr@10"].mean()
    assert hr > 3 * 10 / len(ids)  # well above a random ranker's HR@10

"""The generative retriever: beam search against a brute-force scorer, and that it learns."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from quasid.stack.config import RetrieverConfig
from quasid.stack.retriever import Retriever, train_retriever, trim_padding
from quasid.stack.training import bucketed_batches
from quasid.stack.trie import SidTrie, full_codes
from tests.quasid.sid_testing import one_thread, random_sid_table  # noqa: F401 (fixture)

TINY = RetrieverConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_history=5, dropout=0.0)


def _model(n_items: int = 40, seed: int = 0) -> Retriever:
    _, codes = full_codes(random_sid_table(np.arange(n_items), levels=2, k=4, seed=seed))
    torch.manual_seed(seed)
    model = Retriever(SidTrie.from_codes(codes), TINY).eval()
    with torch.no_grad():  # peaked distributions, so the ranking is not a near-tie
        nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_beam_as_wide_as_the_catalog_is_the_brute_force_ranking():
    model = _model()
    n = model.trie.n_items
    hist = torch.from_numpy(np.random.default_rng(0).integers(-1, n, (8, 5)))
    rows, scores = model.beam_search(hist, beam=n)
    brute = model.score_items(hist, torch.arange(n).expand(len(hist), -1))
    expected_scores, expected_rows = brute.sort(dim=1, descending=True)
    assert torch.allclose(scores, expected_scores, atol=1e-5)
    assert torch.equal(rows, expected_rows)
    # every item's probability under the model sums (over valid codes) to at most one
    assert (brute.exp().sum(1) <= 1 + 1e-5).all()


def test_narrow_beam_scores_are_the_items_true_log_probabilities():
    model = _model()
    hist = torch.from_numpy(np.random.default_rng(1).integers(-1, 40, (8, 5)))
    rows, scores = model.beam_search(hist, beam=5)
    assert torch.allclose(scores, model.score_items(hist, rows), atol=1e-5)
    brute = model.score_items(hist, torch.arange(40).expand(8, -1))
    # a beam may miss the best item, but never returns one scoring above the best
    assert (scores[:, 0] <= brute.max(1).values + 1e-5).all()


def test_trim_padding_and_bucketed_batches():
    h = torch.tensor([[-1, -1, -1, 4], [-1, -1, 2, 3]])
    assert trim_padding(h).tolist() == [[-1, 4], [2, 3]]
    assert trim_padding(torch.full((2, 3), -1)).shape == (2, 1)
    lengths = np.random.default_rng(0).integers(0, 20, 1000)
    batches = bucketed_batches(lengths, 64, torch.Generator().manual_seed(0))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))  # each index once
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 5  # similar lengths within a batch (random batches: ~19)


def test_training_learns_a_deterministic_next_item_rule():
    model = _model(n_items=30, seed=3)
    nxt = np.random.default_rng(3).permutation(30)  # the item after i is always nxt[i]
    rng = np.random.default_rng(4)
    last = rng.integers(0, 30, 600)
    hist = np.full((600, 5), -1)
    hist[:, -1] = last
    hist[:, -2] = rng.integers(-1, 30, 600)  # noise the model must learn to ignore
    cfg = RetrieverConfig(**{**TINY.__dict__, "epochs": 10, "batch_size": 64, "lr": 1e-2,
                             "warmup_steps": 10})
    model.cfg = cfg
    model.train()
    losses = train_retriever(model, hist, nxt[last], seed=0)
    assert losses[-1] < losses[0] / 3
    probe = torch.from_numpy(np.c_[np.full((30, 4), -1), np.arange(30)])
    top1 = model.beam_search(probe, beam=3)[0][:, 0].numpy()
    assert (top1 == nxt).mean() >= 0.9


def test_same_seed_same_model():
    hist = np.random.default_rng(0).integers(-1, 40, (200, 5))
    tgt = np.random.default_rng(1).integers(0, 40, 200)
    cfg = RetrieverConfig(**{**TINY.__dict__, "epochs": 1, "batch_size": 64, "dropout": 0.1})
    states = []
    for _ in range(2):
        model = _model()
        model.cfg = cfg
        train_retriever(model, hist, tgt, seed=5)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

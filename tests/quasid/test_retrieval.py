"""The generative retriever: beam search against a brute-force scorer, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
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
    losses = train_retriever(model, hist, nxt[last], seed=0).losses
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


def test_attention_equals_torch_multihead_attention_with_the_same_weights():
    from quasid.stack.retriever import Attention

    torch.manual_seed(0)
    ours = Attention(16, 4, 4, dropout=0.0).eval()
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    keep = torch.rand(3, 7) > 0.3
    keep[:, 0] = True
    expected = ref(x, ctx, ctx, key_padding_mask=~keep, need_weights=False)[0]
    assert torch.allclose(ours(x, ctx, keep=keep), expected, atol=1e-5)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert torch.allclose(ours(x, causal=True), expected, atol=1e-5)


def test_heads_wider_than_the_model_beam_is_still_the_brute_force_ranking():
    # TIGER's shape: heads x head_dim (3 x 16) wider than the model (32)
    _, codes = full_codes(random_sid_table(np.arange(30), levels=2, k=4, seed=2))
    torch.manual_seed(2)
    cfg = RetrieverConfig(**{**TINY.__dict__, "n_heads": 3, "head_dim": 16, "n_layers": 2})
    model = Retriever(SidTrie.from_codes(codes), cfg).eval()
    assert model.encoder[0].attn.q.weight.shape == (48, 32)
    hist = torch.from_numpy(np.random.default_rng(2).integers(-1, 30, (6, 5)))
    rows, scores = model.beam_search(hist, beam=30)
    brute = model.score_items(hist, torch.arange(30).expand(6, -1))
    assert torch.allclose(scores, brute.sort(dim=1, descending=True).values, atol=1e-5)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    from quasid.stack.training import train_epochs

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(64, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9, 1.0])  # best at epoch 1, then 2 epochs without gain
    seen = []
    history = train_epochs(
        model, lambda idx, _: model(x[idx]).pow(2).mean(), np.zeros((64, 1)), 16, 10, opt, sched,
        torch.Generator().manual_seed(0), validate=lambda: next(scores), patience=2,
        progress=lambda e, loss, s: seen.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert history.valid == [0.1, 0.3, 0.2, 0.25]
    assert (history.best_epoch, len(history.losses), history.stopped_early) == (1, 4, True)
    assert all(torch.equal(model.state_dict()[k], seen[1][k]) for k in seen[1])
    assert not torch.equal(seen[1]["weight"], seen[3]["weight"])  # it did train past the best


def test_early_stopping_on_the_beam_hit_rate_of_validation_requests():
    model = _model(n_items=30, seed=3)
    nxt = np.random.default_rng(3).permutation(30)
    last = np.random.default_rng(4).integers(0, 30, 400)
    hist = np.c_[np.full((400, 4), -1), last]
    cfg = RetrieverConfig(**{**TINY.__dict__, "epochs": 6, "batch_size": 64, "lr": 1e-2,
                             "warmup_steps": 5, "patience": 2, "beam": 10})
    model.cfg = cfg
    model.train()
    probe = np.c_[np.full((30, 4), -1), np.arange(30)]
    history = train_retriever(model, hist, nxt[last], seed=0, valid=(probe, nxt))
    assert len(history.valid) == len(history.losses) <= 6
    assert history.valid[history.best_epoch] == max(history.valid) >= 0.9
    from quasid.stack.retriever import beam_hit_rate

    assert beam_hit_rate(model, probe, nxt) == max(history.valid)  # the best weights are loaded
    model.cfg = cfg.model_copy(update={"patience": 1})
    try:
        train_retriever(model, hist, nxt[last], seed=0)
    except ValueError as exc:
        assert "validation requests" in str(exc)
    else:
        raise AssertionError("patience without validation requests must be refused")


def _item_token_model(n_items: int = 40, seed: int = 0) -> Retriever:
    _, codes = full_codes(random_sid_table(np.arange(n_items), levels=2, k=4, seed=seed))
    torch.manual_seed(seed)
    cfg = RetrieverConfig(**{**TINY.__dict__, "history_tokens": "item"})
    model = Retriever(SidTrie.from_codes(codes), cfg).eval()
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_one_token_per_item_history_reads_items_not_levels():
    model = _item_token_model()
    hist = torch.tensor([[-1, -1, 3, 7, 9], [-1, -1, -1, -1, 5]])
    memory, keep = model.encode(hist)
    assert memory.shape[:2] == (2, 4) and keep.tolist() == [[True] * 4, [False, False, True, True]]
    # the same items in another left padding give the same memory (positions count from the end)
    padded = torch.tensor([[-1, 3, 7, 9], [-1, -1, -1, 5]])
    model.cfg = RetrieverConfig(**{**model.cfg.__dict__, "max_history": 4})
    again, _ = model.encode(padded)
    assert torch.allclose(again, memory, atol=1e-6)
    # beam search over the whole catalog is still the brute-force ranking
    n = model.trie.n_items
    rows, scores = model.beam_search(hist, beam=n)
    brute = model.score_items(hist, torch.arange(n).expand(len(hist), -1))
    assert torch.allclose(scores, brute.sort(dim=1, descending=True).values, atol=1e-5)


def test_one_token_per_item_history_learns_the_next_item_rule():
    model = _item_token_model(n_items=30, seed=3)
    nxt = np.random.default_rng(3).permutation(30)
    rng = np.random.default_rng(4)
    last = rng.integers(0, 30, 600)
    hist = np.full((600, 5), -1)
    hist[:, -1] = last
    hist[:, -2] = rng.integers(-1, 30, 600)
    model.cfg = RetrieverConfig(**{**model.cfg.__dict__, "epochs": 10, "batch_size": 64,
                                   "lr": 1e-2, "warmup_steps": 10})
    model.train()
    losses = train_retriever(model, hist, nxt[last], seed=0).losses
    assert losses[-1] < losses[0] / 3
    probe = torch.from_numpy(np.c_[np.full((30, 4), -1), np.arange(30)])
    assert (model.beam_search(probe, beam=3)[0][:, 0].numpy() == nxt).mean() >= 0.9


def _full_prefix_beam_search(model: Retriever, hist: torch.Tensor, beam: int):
    """The beam search as it was before the decoder cache: the whole prefix re-decoded at
    every level (`Retriever.decode`), the reference the incremental one must match."""
    trie = model.trie
    memory, keep = model.encode(hist)
    b = hist.shape[0]
    node, score = torch.zeros((b, 1), dtype=torch.int64), torch.zeros((b, 1))
    prefix = torch.zeros((b, 1, 0), dtype=torch.int64)
    for d in range(trie.depth):
        w = node.shape[1]
        lp = model.level_log_probs(model.decode(memory, keep, prefix)[:, :, -1], d)
        tok, nxt = trie.padded(d)
        child_tok, child_node = tok[node.clamp(min=0)], nxt[node.clamp(min=0)]
        fan = child_tok.shape[2]
        cand = torch.where(child_tok >= 0, lp.gather(2, child_tok.clamp(min=0)) + score[..., None],
                           -torch.inf)
        score, idx = cand.reshape(b, w * fan).topk(min(beam, w * fan), dim=1)
        parent = idx // fan
        node = child_node.reshape(b, w * fan).gather(1, idx)
        new_tok = child_tok.reshape(b, w * fan).gather(1, idx) + model.offsets[d]
        prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, d)),
                            new_tok[..., None]], dim=2)
    return torch.where(torch.isfinite(score), node, -1), score


@pytest.mark.parametrize("history_tokens", ["levels", "item"])
def test_incremental_beam_search_returns_what_redecoding_the_whole_prefix_returns(history_tokens):
    # 3 SID levels + the collision rank, 2 decoder layers: the cache is extended and
    # reordered (beams change parents) at every level
    _, codes = full_codes(random_sid_table(np.arange(300), levels=3, k=8, seed=3))
    torch.manual_seed(3)
    cfg = RetrieverConfig(**{**TINY.__dict__, "n_layers": 2, "history_tokens": history_tokens})
    model = Retriever(SidTrie.from_codes(codes), cfg).eval()
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=0.5)
    hist = torch.from_numpy(np.random.default_rng(3).integers(-1, 300, (32, 5)))
    for beam in (1, 7, 40):
        rows, scores = model.beam_search(hist, beam)
        expected_rows, expected_scores = _full_prefix_beam_search(model, hist, beam)
        assert torch.equal(rows, expected_rows)
        assert torch.allclose(scores, expected_scores, atol=1e-5)
    assert torch.allclose(scores, model.score_items(hist, rows), atol=1e-5)


def test_incremental_candidate_scores_are_the_teacher_forced_level_scores():
    _, codes = full_codes(random_sid_table(np.arange(300), levels=3, k=8, seed=4))
    torch.manual_seed(4)
    model = Retriever(SidTrie.from_codes(codes), RetrieverConfig(**{**TINY.__dict__,
                                                                   "n_layers": 2})).eval()
    hist = torch.from_numpy(np.random.default_rng(4).integers(-1, 300, (16, 5)))
    rows = torch.from_numpy(np.random.default_rng(5).integers(0, 300, (16, 25)))
    encoded = model.encode(hist)
    got = model.candidate_scores(model.decoder_start(*encoded), rows)
    assert got.shape == (16, 25, model.depth)
    assert torch.allclose(got, model.level_scores(hist, rows, encoded), atol=1e-5)
    # the first level depends on the history alone: one BOS state per request
    assert torch.allclose(got[:, :, 0], model.level_log_probs(
        model.decoder_start(*encoded).hidden[:, 0], 0).gather(1, model.trie.codes[rows][..., 0]))

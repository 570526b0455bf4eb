"""The SID trie against brute force: its edges, lookups, and that decoding through it only
ever produces real items' codes, even when the model prefers invalid tokens."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from quasid.core.schemas import ContractError
from quasid.stack.config import RetrieverConfig
from quasid.stack.retriever import Retriever
from quasid.stack.trie import SidTrie, full_codes
from tests.quasid.sid_testing import (  # noqa: F401 (one_thread: fixture)
    one_thread,
    random_sid_table,
    sid_table_from_codes,
)

TINY = RetrieverConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_history=4)


def _codes(n: int = 60, levels: int = 3, k: int = 5, seed: int = 0) -> np.ndarray:
    _, codes = full_codes(random_sid_table(np.arange(n) * 3 + 1, levels, k, seed))
    return codes


def test_full_codes_append_collision_rank_and_sort_by_item():
    table = sid_table_from_codes(np.array([30, 10, 20]), np.array([[1, 2], [1, 2], [0, 5]]), "t")
    ids, codes = full_codes(table)
    assert ids.tolist() == [10, 20, 30]
    # items 10 and 30 share SID (1, 2): the lower item id gets rank 0
    assert codes.tolist() == [[1, 2, 0], [0, 5, 0], [1, 2, 1]]


def test_full_codes_reject_two_items_with_one_full_code():
    table = pl.DataFrame({"item_id": [1, 2], "sid": [[3, 4], [3, 4]], "tokenizer": ["t", "t"],
                          "collision_rank": [0, 0]},
                         schema={"item_id": pl.Int64, "sid": pl.List(pl.Int16), "tokenizer": pl.String,
                                 "collision_rank": pl.Int16})
    with pytest.raises(ContractError, match=r"sids.parquet.*items \[1, 2\].*\[3, 4, 0\]"):
        full_codes(table, source="sids.parquet")


def test_edges_are_exactly_the_distinct_next_tokens_of_each_prefix():
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    for d in range(trie.depth):
        prefixes = sorted({tuple(c[:d]) for c in codes.tolist()})
        assert trie.n_nodes(d) == len(prefixes)
        tok, nxt = trie.padded(d)
        for node, prefix in enumerate(prefixes):  # nodes are numbered in lexicographic order
            expected = sorted({c[d] for c in codes.tolist() if tuple(c[:d]) == prefix})
            got = tok[node][tok[node] >= 0].tolist()
            assert got == expected
            if d == trie.depth - 1:  # leaves point at the item rows
                leaf_rows = nxt[node][tok[node] >= 0].tolist()
                assert [codes[r].tolist() for r in leaf_rows] == [list(prefix) + [t] for t in expected]


def test_lookup_finds_every_item_and_rejects_everything_else():
    codes = _codes()
    trie = SidTrie.from_codes(codes)
    assert trie.lookup(torch.from_numpy(codes)).tolist() == list(range(len(codes)))
    rng = np.random.default_rng(1)
    probes = rng.integers(0, 6, (500, codes.shape[1]))
    known = {tuple(c): r for r, c in enumerate(codes.tolist())}
    expected = [known.get(tuple(p), -1) for p in probes.tolist()]
    assert trie.lookup(torch.from_numpy(probes)).tolist() == expected
    assert -1 in expected and any(e >= 0 for e in expected)  # the probe hits both cases


def test_trie_state_round_trip():
    codes = _codes()
    trie = SidTrie.from_codes(codes, vocab=(8, 8, 8, 4))
    back = SidTrie.from_state_dict(trie.state_dict())
    assert back.vocab == (8, 8, 8, 4)
    for d in range(trie.depth):
        assert torch.equal(back.token[d], trie.token[d]) and torch.equal(back.child[d], trie.child[d])
    with pytest.raises(ValueError, match="vocab"):
        SidTrie.from_codes(codes, vocab=(2, 2, 2, 2))


@pytest.mark.parametrize("beam", [1, 7, 40])
def test_beam_search_never_yields_an_invalid_sid(beam):
    # a sparse table (60 of 5**3 SIDs used) and a model pushed towards the unused tokens
    codes = _codes()
    trie = SidTrie.from_codes(codes, vocab=(6, 6, 6, int(codes[:, -1].max()) + 2))
    torch.manual_seed(0)
    model = Retriever(trie, TINY).eval()
    with torch.no_grad():
        bias = torch.zeros(model.n_tokens)
        for d in range(trie.depth):  # tokens no item uses at a level get a huge logit
            unused = sorted(set(range(trie.vocab[d])) - set(codes[:, d].tolist()))
            bias[int(model.offsets[d]) + torch.tensor(unused, dtype=torch.long)] = 50.0
        model.head.bias.copy_(bias)
    hist = torch.from_numpy(np.random.default_rng(2).integers(-1, len(codes), (32, 4)))
    rows, scores, gen = model.beam_search(hist, beam, return_codes=True)
    assert rows.shape == (32, beam)
    assert (rows >= 0).all() and torch.isfinite(scores).all()
    # the generated tokens are the returned item's code, and the trie agrees
    assert torch.equal(gen, trie.codes[rows])
    assert torch.equal(trie.lookup(gen), rows)
    for r in rows.tolist():
        assert len(set(r)) == beam  # no item twice
    assert (scores[:, 1:] <= scores[:, :-1] + 1e-6).all()


def test_beam_wider_than_the_catalog_pads_the_tail():
    codes = _codes(n=5)
    model = Retriever(SidTrie.from_codes(codes), TINY).eval()
    rows, scores = model.beam_search(torch.full((2, 4), -1), 8)
    assert sorted(rows[0, :5].tolist()) == list(range(5))
    assert (rows[:, 5:] == -1).all() and torch.isinf(scores[:, 5:]).all()

"""SID metrics and SID assignment against hand-computed examples and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quasid.core.schemas import SID_TABLE, ContractError, validate
from quasid.tokenizer.metrics import nearest_sid_hamming, pair_hamming, sid_metrics
from quasid.tokenizer.sids import collision_ranks, sid_table

CODES = np.array([[0, 0], [0, 0], [0, 1], [1, 1], [2, 2]])


def test_metrics_hand_computed():
    m = sid_metrics(CODES, codebook_size=4)
    assert m["unique_sids"] == 4
    assert m["collision_rate"] == pytest.approx(0.2)
    p = np.array([0.4, 0.2, 0.2, 0.2])
    assert m["sid_entropy"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert m["sid_entropy"] == pytest.approx(1.921928, rel=1e-6)
    # level 0 uses {0, 1, 2} of 4 codes (counts 3, 1, 1); level 1 uses {0, 1, 2} (2, 2, 1)
    assert m["codebook_utilization_per_level"] == [0.75, 0.75]
    assert m["codebook_utilization"] == 0.75
    q0 = np.array([0.6, 0.2, 0.2])
    assert m["perplexity_per_level"][0] == pytest.approx(math.exp(-(q0 * np.log(q0)).sum()))
    # nearest SIDs: items 0, 1 collide; 2 and 3 are one level apart; 4 two levels from all
    assert nearest_sid_hamming(CODES).tolist() == [0, 0, 1, 1, 2]
    assert m["nearest_hamming_hist"] == [2, 2, 1]
    assert "harmful_collision_rate" not in m


def test_nearest_sid_hamming_matches_brute_force():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 3, size=(300, 4))
    ham = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    np.fill_diagonal(ham, 99)
    assert np.array_equal(nearest_sid_hamming(codes), ham.min(axis=1))


def test_harmful_and_benign_rates_on_the_world(small_world):
    world = small_world.world
    n = world.n_items
    item_ids = small_world.items["item_id"].to_numpy()
    # every item its own SID (three base-16 digits of its id), then half of the look-alike
    # pairs made to share a full SID and the other half all but the last level
    codes = np.stack([item_ids // 256, (item_ids // 16) % 16, item_ids % 16], axis=1)
    pairs = world.lookalike_pairs
    half = len(pairs) // 2
    codes[pairs[:half, 1]] = codes[pairs[:half, 0]]
    codes[pairs[half:, 1], :2] = codes[pairs[half:, 0], :2]
    codes[pairs[half:, 1], 2] = (codes[pairs[half:, 0], 2] + 1) % 16
    m = sid_metrics(codes, 16, item_ids, world)
    assert m["harmful_pairs"] == len(pairs)
    assert m["harmful_collision_rate"] == pytest.approx(1.0)
    assert m["harmful_full_collision_rate"] == pytest.approx(half / len(pairs))
    benign = world.benign_pairs()
    h = pair_hamming(codes, benign)
    assert m["benign_collision_rate"] == pytest.approx(float((h <= 1).mean()))
    assert m["benign_pairs"] == len(benign) and n == len(codes)


def test_metrics_reject_out_of_range_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2\)"):
        sid_metrics(CODES, codebook_size=2)


def test_collision_ranks_follow_item_id_order():
    codes = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    item_ids = torch.tensor([50, 7, 3, 9, 1])
    # SID (1, 2) holds items 50, 3, 9 -> ranks 2, 0, 1
    assert collision_ranks(codes, item_ids).tolist() == [2, 0, 0, 1, 0]


def test_sid_table_is_a_valid_sid_table_with_unique_full_ids():
    item_ids = np.array([50, 7, 3, 9, 1])
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    table = sid_table(item_ids, codes, "rqvae")
    validate(table, SID_TABLE)
    assert table["item_id"].to_list() == [1, 3, 7, 9, 50]
    assert table["collision_rank"].to_list() == [0, 0, 0, 1, 2]
    assert table["sid"].to_list()[1] == [1, 2]
    assert set(table["tokenizer"].to_list()) == {"rqvae"}
    ranks = table["collision_rank"].to_list()
    full = {(tuple(s), r) for s, r in zip(table["sid"].to_list(), ranks)}
    assert len(full) == 5


def test_sid_table_rejects_codes_beyond_int16():
    with pytest.raises(ValueError, match="int16"):
        sid_table(np.array([1]), np.array([[40_000]]), "x")
    with pytest.raises((ValueError, ContractError)):
        sid_table(np.array([1, 1]), np.array([[0], [1]]), "x")  # duplicate item ids

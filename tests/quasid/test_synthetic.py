"""The synthetic world delivers what it claims, byte-identically for a seed."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from quasid.data.dataset import load_dataset
from quasid.data.splits import time_split
from quasid.data.synthetic import WorldConfig, synthesize
from tests.conftest import SMALL_WORLD


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_differs(tmp_path, small_world_dir):
    again = tmp_path / "again"
    synthesize(WorldConfig(**SMALL_WORLD), again)
    assert _digest(again) == _digest(small_world_dir)
    other = tmp_path / "other"
    synthesize(WorldConfig(**{**SMALL_WORLD, "seed": SMALL_WORLD["seed"] + 1}), other)
    differ = {k for k, v in _digest(other).items() if _digest(small_world_dir)[k] != v}
    assert {"items.parquet", "interactions.parquet", "world.npz"} <= differ


def test_chunking_does_not_change_the_data(tmp_path, small_world_dir):
    chunked = tmp_path / "chunked"
    synthesize(WorldConfig(**SMALL_WORLD, chunk_requests=1_000), chunked)
    # chunk streams differ, so the logs differ, but the catalog and truth must not
    a, b = load_dataset(chunked), load_dataset(small_world_dir)
    assert a.items.drop("is_cold").equals(b.items.drop("is_cold"))
    assert np.array_equal(a.world.item_taste, b.world.item_taste)


def _cosine(content: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    x = content / np.linalg.norm(content, axis=1, keepdims=True)
    return (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1)


def _user_overlap(inter: pl.DataFrame, n_items: int, pairs: np.ndarray) -> np.ndarray:
    """Jaccard similarity of the user sets of each item pair."""
    u, i = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    m = sp.csr_matrix((np.ones(len(u)), (i, u)), shape=(n_items, int(u.max()) + 1))
    m.data[:] = 1
    a, b = m[pairs[:, 0]], m[pairs[:, 1]]
    both = np.asarray(a.multiply(b).sum(1)).ravel()
    union = np.asarray(a.sum(1)).ravel() + np.asarray(b.sum(1)).ravel() - both
    return both / np.maximum(union, 1)


def test_near_duplicates_are_close_and_co_interacted(small_world):
    w, content = small_world.world, small_world.content()
    benign = w.benign_pairs()
    assert len(benign) > 20
    assert np.all(w.dup_group[benign[:, 0]] == w.dup_group[benign[:, 1]])
    assert _cosine(content, benign).min() > 0.97
    rng = np.random.default_rng(0)
    random_pairs = rng.integers(0, w.n_items, size=(2_000, 2))
    overlap = _user_overlap(small_world.interactions, w.n_items, benign)
    assert overlap.mean() > 10 * _user_overlap(small_world.interactions, w.n_items,
                                                random_pairs).mean()
    assert (overlap > 0).mean() > 0.6


def test_lookalikes_are_close_in_content_with_disjoint_audiences(small_world):
    w, content = small_world.world, small_world.content()
    pairs = w.lookalike_pairs
    assert len(pairs) == round(0.10 * w.n_items / 2)
    cos = _cosine(content, pairs)
    assert cos.min() >= 0.90 - 1e-4 and cos.max() <= 0.97 + 1e-4
    # opposite item-specific taste: true affinities of their users point different ways
    overlap = _user_overlap(small_world.interactions, w.n_items, pairs)
    benign = _user_overlap(small_world.interactions, w.n_items, w.benign_pairs())
    assert overlap.mean() < 0.2 * benign.mean()
    # ... and fewer than two random items of one leaf category, which share a taste centre
    order = np.argsort(w.item_leaf, kind="stable")
    same_leaf = np.stack([order[:-1], order[1:]], axis=1)
    same_leaf = same_leaf[w.item_leaf[same_leaf[:, 0]] == w.item_leaf[same_leaf[:, 1]]]
    assert overlap.mean() < _user_overlap(small_world.interactions, w.n_items, same_leaf).mean()
    # and content alone puts them as close as near-duplicates are to ordinary neighbours
    x = content / np.linalg.norm(content, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    assert np.median(cos) > np.median(sim.max(1)) - 0.05


def _affinity_correlation(world, pairs) -> np.ndarray:
    """Per pair, the correlation over all users of the two items' true preference logits."""
    a = world.user_pref @ world.item_taste[pairs[:, 0]].T
    b = world.user_pref @ world.item_taste[pairs[:, 1]].T
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def test_lookalike_partners_belong_to_another_leaf_with_an_opposed_audience():
    from quasid.data.synthetic import generate

    cfg = {**SMALL_WORLD, "n_users": 300, "mean_interactions": 2.0}
    items, _, world = generate(WorldConfig(**cfg))
    _, _, before = generate(WorldConfig(**cfg, lookalike_other_leaf=False))
    pairs = world.lookalike_pairs
    assert np.array_equal(pairs, before.lookalike_pairs)
    # the partner (and only it) moves to another leaf, with that leaf's price level
    partner = np.flatnonzero(world.item_leaf != before.item_leaf)
    assert len(partner) == len(pairs)
    assert np.all(world.item_leaf[pairs[:, 0]] != world.item_leaf[pairs[:, 1]])
    # one reference price per leaf, the partners' included; the price keeps its jitter around it
    refs = pl.DataFrame({"leaf": world.item_leaf, "ref": world.price_ref})
    assert refs.group_by("leaf").agg(pl.col("ref").n_unique())["ref"].max() == 1
    assert np.allclose(world.price[partner] / world.price_ref[partner],
                       before.price[partner] / before.price_ref[partner], rtol=1e-2)
    others = np.setdiff1d(np.arange(world.n_items), partner)
    assert np.array_equal(world.item_taste[others], before.item_taste[others])
    assert np.array_equal(world.item_pop, before.item_pop)
    # content is the same either way (the look-alike is in the content, not the audience)
    content = np.stack(items["content"].to_numpy())
    assert _cosine(content, pairs).min() >= 0.90 - 1e-4
    # mirroring only the item-specific taste kept the leaf taste shared: correlated appeal;
    # another leaf's taste centre opposes it
    assert np.median(_affinity_correlation(before, pairs)) > 0.3
    assert np.median(_affinity_correlation(world, pairs)) < 0.0


def test_new_items_have_no_interactions_before_cutoff(small_world):
    w, inter = small_world.world, small_world.interactions
    train, window = time_split(inter, small_world.cutoff_ts)
    new_ids = np.flatnonzero(w.is_new)
    assert len(new_ids) == round(0.10 * w.n_items)
    assert not train["item_id"].is_in(pl.Series(new_ids).implode()).any()
    assert window["item_id"].is_in(pl.Series(new_ids).implode()).any()
    cold = small_world.items.filter("is_cold")["item_id"].to_numpy()
    assert set(new_ids) <= set(cold)
    assert not train["item_id"].is_in(pl.Series(cold).implode()).any()


def test_prices_are_lognormal_around_leaf_medians(small_world):
    w = small_world.world
    rel = np.log(w.price / w.price_ref)
    assert abs(np.median(rel)) < 0.1 and 0.2 < rel.std() < 0.6
    assert (small_world.items["price"] > 0).all()


def test_logged_choices_follow_the_true_preferences(small_world):
    w, inter = small_world.world, small_world.interactions
    u, i = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    chosen = w.affinity(u, i)
    rng = np.random.default_rng(1)
    random = w.affinity(u, rng.integers(0, w.n_items, len(u)))
    assert chosen.mean() > random.mean() + 2.0
    bought = inter["event"].to_numpy() == "purchase"
    assert chosen[bought].mean() > chosen[~bought].mean()  # orders rise with affinity


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="cutoff_day"):
        WorldConfig(cutoff_day=100)

"""The built-in synthetic world: items, users and logged traffic with a known ground truth.

Built so that SID collisions matter:
- a 3-level category tree; content = category centroids + a view of the item's taste + noise;
- benign overlaps: near-duplicate groups (variants of one product): the same taste, content
  cosine ~0.99, browsed together (a user who takes one variant often looks at another);
- harmful look-alikes: pairs whose content cosine is 0.90-0.97 while their audiences are
  disjoint, so only the collaborative signal tells them apart: the partner's taste is another
  leaf's taste centre with the anchor's item-specific taste mirrored, and it is sold (category,
  price level, the old recommender's favourite-leaf slates) in that leaf;
- log-normal prices around leaf-category medians; users with a favourite leaf, taste, price
  sensitivity and activity; logged interactions drawn from the true model through an old
  recommender's slates (popularity, favourite-category and random candidates, position bias);
- new items that arrive after the training cutoff (content known, no earlier interactions).

Everything is numpy, vectorized and chunked over requests; the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import model_validator

from quasid.core.config import Config
from quasid.data.dataset import counts, write_dataset
from quasid.data.world import DAY_SECONDS, World


class WorldConfig(Config):
    """Size and shape of a synthetic world; defaults generate in seconds."""

    n_items: int = 5_000
    n_users: int = 20_000
    content_dim: int = 64
    taste_dim: int = 16
    branching: tuple[int, int, int] = (4, 4, 4)
    duplicate_share: float = 0.15
    duplicate_group_sizes: tuple[int, int] = (2, 4)
    duplicate_noise: float = 0.12
    lookalike_share: float = 0.10
    lookalike_cos: tuple[float, float] = (0.90, 0.97)
    # True: a look-alike partner belongs to another leaf (taste centre, category, price level):
    # disjoint audiences. False (the worlds before issue 15): it stays in the anchor's leaf with
    # only the item-specific taste mirrored, and the shared leaf taste dominates both (true
    # affinities correlate ~ +0.5 over users; ~5% of pairs are co-interacted positives)
    lookalike_other_leaf: bool = True
    new_item_share: float = 0.10
    mean_interactions: float = 10.0
    days: int = 60
    cutoff_day: int = 45
    candidates: int = 20
    variant_browse: float = 0.4
    taste_scale: float = 1.6
    item_taste_scale: float = 2.0
    content_taste_weight: float = 1.0
    content_noise: float = 0.5
    price_median: float = 25.0
    price_category_sigma: float = 0.6
    price_item_sigma: float = 0.35
    temperature: float = 1.0
    position_decay: float = 0.8
    max_positions: int = 50
    click_bias: float = -6.0
    order_bias: float = -3.5
    order_slope: float = 0.4
    cancel_rate: float = 0.08
    quantity_extra: float = 0.3
    chunk_requests: int = 200_000
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> WorldConfig:
        d = self
        checks = {  # field: (ok, its value, the rule)
            "n_items": (d.n_items >= 50, d.n_items, ">= 50"),
            "n_users": (d.n_users >= 10, d.n_users, ">= 10"),
            "content_dim": (d.content_dim >= 4, d.content_dim, ">= 4"),
            "taste_dim": (d.taste_dim >= 2, d.taste_dim, ">= 2"),
            "duplicate_share + lookalike_share": (
                0 <= d.duplicate_share + d.lookalike_share < 0.8,
                d.duplicate_share + d.lookalike_share, "in [0, 0.8)"),
            "new_item_share": (0 <= d.new_item_share < 0.5, d.new_item_share, "in [0, 0.5)"),
            "cutoff_day": (0 < d.cutoff_day < d.days, d.cutoff_day, f"in (0, days={d.days})"),
            "lookalike_cos": (0 < d.lookalike_cos[0] <= d.lookalike_cos[1] < 1, d.lookalike_cos,
                              "0 < low <= high < 1"),
            "candidates": (2 <= d.candidates <= d.max_positions, d.candidates,
                           f"in [2, max_positions={d.max_positions}]"),
            "mean_interactions": (d.mean_interactions >= 1, d.mean_interactions, ">= 1"),
        }
        bad = [f"{k}: {value} (expected {rule})" for k, (ok, value, rule) in checks.items()
               if not ok]
        if bad:
            raise ValueError("WorldConfig: " + "; ".join(bad))
        return self


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per purpose (and per chunk), so chunks never share draws."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class _Catalog:
    leaf: np.ndarray
    taste: np.ndarray
    content: np.ndarray
    pop: np.ndarray
    price: np.ndarray
    price_ref: np.ndarray
    dup_group: np.ndarray
    lookalike_pairs: np.ndarray
    is_new: np.ndarray
    category: list[str]


def _category_names(branching: tuple[int, int, int]) -> list[str]:
    b1, b2, b3 = branching
    leaf = np.arange(b1 * b2 * b3)
    top, mid, low = leaf // (b2 * b3), (leaf // b3) % b2, leaf % b3
    return [f"c{t}/c{t}.{m}/c{t}.{m}.{lo}" for t, m, lo in zip(top, mid, low)]


def _hierarchy(rng: np.random.Generator, branching: tuple[int, int, int], dim: int) -> np.ndarray:
    """Leaf vectors = top + 0.7 mid + 0.5 leaf offsets (each ~unit norm): siblings stay close."""
    b1, b2, b3 = branching
    leaf = np.arange(b1 * b2 * b3)
    top = rng.normal(size=(b1, dim))[leaf // (b2 * b3)]
    mid = rng.normal(size=(b1 * b2, dim))[leaf // b3]
    low = rng.normal(size=(b1 * b2 * b3, dim))
    return (top + 0.7 * mid + 0.5 * low) / np.sqrt(dim)


def _build_catalog(cfg: WorldConfig) -> _Catalog:
    rng = _rng(cfg.seed, 1)
    n, dim, d = cfg.n_items, cfg.content_dim, cfg.taste_dim
    n_leaf = int(np.prod(cfg.branching))
    leaf_center = _hierarchy(rng, cfg.branching, dim)
    leaf_taste = cfg.taste_scale * _hierarchy(rng, cfg.branching, d)
    leaf_weight = rng.dirichlet(np.full(n_leaf, 2.0))
    leaf_price = cfg.price_median * np.exp(rng.normal(0, cfg.price_category_sigma, n_leaf))
    mixing = _unit_rows(rng.normal(size=(dim, d)).T).T  # taste -> content, unit columns

    # Roles, laid out in blocks and shuffled at the end: look-alike pairs, duplicate
    # groups (one product, several variants), plain items.
    n_pairs = int(round(cfg.lookalike_share * n / 2))
    lo, hi = cfg.duplicate_group_sizes
    sizes = rng.integers(lo, hi + 1, size=max(1, int(cfg.duplicate_share * n / lo) + 1))
    sizes = sizes[np.cumsum(sizes) <= cfg.duplicate_share * n]
    n_dup = int(sizes.sum())
    n_plain = n - 2 * n_pairs - n_dup
    n_products = n_pairs + len(sizes) + n_plain  # one taste + content draw per product

    prod_leaf = rng.choice(n_leaf, size=n_products, p=leaf_weight)
    prod_specific = rng.normal(size=(n_products, d)) / np.sqrt(d)
    prod_content = (
        leaf_center[prod_leaf]
        + cfg.content_taste_weight * prod_specific @ mixing.T
        + cfg.content_noise * rng.normal(size=(n_products, dim)) / np.sqrt(dim)
    )
    prod_pop = rng.normal(0, 0.8, n_products)
    prod_price = leaf_price[prod_leaf] * np.exp(rng.normal(0, cfg.price_item_sigma, n_products))

    # Item -> product map: pair partners get their own slot, variants repeat their product.
    pair_prod = np.arange(n_pairs)
    dup_prod = n_pairs + np.repeat(np.arange(len(sizes)), sizes)
    plain_prod = n_pairs + len(sizes) + np.arange(n_plain)
    item_prod = np.concatenate([pair_prod, pair_prod, dup_prod, plain_prod])
    leaf = prod_leaf[item_prod]
    specific = prod_specific[item_prod].copy()
    content = prod_content[item_prod].copy()
    pop = prod_pop[item_prod].copy()
    price = prod_price[item_prod].copy()

    # Look-alike partners: content rotated from the original by an angle with cosine in
    # lookalike_cos, the opposite item-specific taste, popularity drawn afresh and, with
    # lookalike_other_leaf, another leaf's taste centre, category and price level (drawn
    # from a stream of its own, so the rest of the catalog is the same either way). Mirroring
    # the item-specific taste alone leaves the shared leaf taste in charge of both items'
    # appeal: their audiences overlapped almost as much as two items of one leaf.
    partner = slice(n_pairs, 2 * n_pairs)
    specific[partner] = -specific[partner]
    if cfg.lookalike_other_leaf:
        own = leaf[partner].copy()  # a slice is a view: keep the anchor leaves
        # a leaf other than the anchor's, in proportion to the leaves' weights
        weights = np.broadcast_to(leaf_weight, (n_pairs, n_leaf)).copy()
        weights[np.arange(n_pairs), own] = 0.0
        cum = np.cumsum(weights, axis=1)
        u = _rng(cfg.seed, 5).random(n_pairs) * cum[:, -1]
        other = np.minimum((cum <= u[:, None]).sum(axis=1), n_leaf - 1)
        leaf[partner] = other
        price[partner] *= leaf_price[other] / leaf_price[own]  # same jitter, its leaf's level
    base = content[partner]
    direction = rng.normal(size=base.shape)
    direction -= (direction * base).sum(1, keepdims=True) / (base * base).sum(1, keepdims=True) * base
    cos = rng.uniform(*cfg.lookalike_cos, size=n_pairs)
    tangent = _unit_rows(direction) * np.linalg.norm(base, axis=1, keepdims=True)
    content[partner] = cos[:, None] * base + np.sqrt(1 - cos**2)[:, None] * tangent
    pop[partner] = rng.normal(0, 0.8, n_pairs)
    price[partner] *= np.exp(rng.normal(0, cfg.price_item_sigma, n_pairs))

    # Variants: small content noise and price jitter around their product.
    dup = slice(2 * n_pairs, 2 * n_pairs + n_dup)
    norms = np.linalg.norm(content[dup], axis=1, keepdims=True)
    content[dup] += cfg.duplicate_noise * norms * rng.normal(size=(n_dup, dim)) / np.sqrt(dim)
    pop[dup] += rng.normal(0, 0.2, n_dup)
    price[dup] *= np.exp(rng.normal(0, 0.05, n_dup))

    dup_group = np.full(n, -1, dtype=np.int32)
    dup_group[dup] = np.repeat(np.arange(len(sizes)), sizes)
    pairs = np.stack([np.arange(n_pairs), n_pairs + np.arange(n_pairs)], axis=1)

    # New items: drawn from everything but the look-alike pairs (whose collaborative
    # signal is the point of those pairs).
    eligible = np.arange(2 * n_pairs, n)
    is_new = np.zeros(n, dtype=bool)
    is_new[rng.choice(eligible, size=int(round(cfg.new_item_share * n)), replace=False)] = True

    taste = leaf_taste[leaf] + cfg.item_taste_scale * specific
    # Shuffle ids so roles are not contiguous; the pairs follow their items.
    perm = rng.permutation(n)  # perm[new_id] = old_id
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n)
    pairs = np.sort(inverse[pairs], axis=1)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    names = _category_names(cfg.branching)
    return _Catalog(
        leaf=leaf[perm].astype(np.int32),
        taste=taste[perm].astype(np.float32),
        content=content[perm].astype(np.float32),
        pop=pop[perm].astype(np.float32),
        price=np.round(price[perm], 2).clip(0.01),
        price_ref=leaf_price[leaf[perm]],
        dup_group=dup_group[perm],
        lookalike_pairs=pairs.astype(np.int64),
        is_new=is_new[perm],
        category=[names[k] for k in leaf[perm]],
    )


def _build_users(cfg: WorldConfig, cat: _Catalog) -> tuple[np.ndarray, ...]:
    rng = _rng(cfg.seed, 2)
    n_leaf = int(np.prod(cfg.branching))
    leaf_counts = np.bincount(cat.leaf, minlength=n_leaf)
    fav = rng.choice(n_leaf, size=cfg.n_users, p=leaf_counts / leaf_counts.sum())
    leaf_taste = np.zeros((n_leaf, cfg.taste_dim))
    np.add.at(leaf_taste, cat.leaf, cat.taste)
    leaf_taste /= np.maximum(leaf_counts, 1)[:, None]
    pref = leaf_taste[fav] + cfg.taste_scale * rng.normal(size=(cfg.n_users, cfg.taste_dim)) / np.sqrt(
        cfg.taste_dim
    )
    sensitivity = rng.lognormal(0.0, 0.5, cfg.n_users)
    activity = rng.lognormal(0.0, 0.8, cfg.n_users)
    activity *= (cfg.mean_interactions - 1) / activity.mean()
    return fav.astype(np.int32), pref.astype(np.float32), sensitivity.astype(np.float32), activity


def _leaf_index(leaf: np.ndarray, n_leaf: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by leaf with each leaf's start and size, for uniform in-leaf sampling."""
    order = np.argsort(leaf, kind="stable")
    counts = np.bincount(leaf, minlength=n_leaf)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, starts, counts


def _log_chunk(
    cfg: WorldConfig, world: World, fav: np.ndarray, users: np.ndarray, ts: np.ndarray, chunk: int
) -> pl.DataFrame:
    """Logged interactions for one chunk of requests (one chosen item per request)."""
    rng = _rng(cfg.seed, 3, chunk)
    n_req, k = len(users), cfg.candidates
    n_leaf = int(np.prod(cfg.branching))
    order, starts, counts = _leaf_index(world.item_leaf, n_leaf)
    pop_p = np.exp(world.item_pop.astype(np.float64))
    pop_p /= pop_p.sum()

    # The old recommender's candidates: 40% popular, 40% favourite leaf, 20% uniform.
    n_pop, n_leafc = int(0.4 * k), int(0.4 * k)
    cand = np.empty((n_req, k), dtype=np.int64)
    cand[:, :n_pop] = rng.choice(world.n_items, size=(n_req, n_pop), p=pop_p)
    user_leaf = fav[users]
    offset = (rng.random((n_req, n_leafc)) * counts[user_leaf][:, None]).astype(np.int64)
    cand[:, n_pop:n_pop + n_leafc] = order[starts[user_leaf][:, None] + offset]
    cand[:, n_pop + n_leafc:] = rng.integers(0, world.n_items, size=(n_req, k - n_pop - n_leafc))

    u = np.broadcast_to(users[:, None], cand.shape)
    utility = world.affinity(u, cand) + world.price_utility(u, cand)
    # The old system ranks by a noisy estimate; the user examines positions with decaying bias.
    rank = np.argsort(-(utility + rng.normal(0, 1.0, utility.shape)), axis=1, kind="stable")
    cand = np.take_along_axis(cand, rank, axis=1)
    utility = np.take_along_axis(utility, rank, axis=1)
    logits = utility / cfg.temperature + np.log(world.position_bias[:k])[None, :]
    unavailable = world.is_new[cand] & (ts[:, None] < world.cutoff_ts)
    logits = np.where(unavailable, -np.inf, logits)
    choice = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    item = cand[np.arange(n_req), choice]
    ok = np.isfinite(logits[np.arange(n_req), choice])
    users, ts, item = users[ok], ts[ok], item[ok]

    # Variant browsing: a user who takes one variant often looks at another of its group.
    group = world.dup_group[item]
    browse = (group >= 0) & (rng.random(len(item)) < cfg.variant_browse)
    g_order = np.argsort(world.dup_group, kind="stable")
    g_sorted = world.dup_group[g_order]
    first = np.searchsorted(g_sorted, group[browse], side="left")
    size = np.searchsorted(g_sorted, group[browse], side="right") - first
    # A random other member: draw a slot among the size-1 others and skip over the item itself.
    pick = (rng.random(browse.sum()) * (size - 1)).astype(np.int64)
    pick += pick >= _position_in_group(g_order, first, size, item[browse])
    member = g_order[first + pick]
    b_ts = ts[browse] + rng.integers(1, 600, browse.sum())
    keep = ~(world.is_new[member] & (b_ts < world.cutoff_ts))
    users = np.concatenate([users, users[browse][keep]])
    items = np.concatenate([item, member[keep]])
    ts = np.concatenate([ts, b_ts[keep]])

    u_order = world.affinity(users, items)
    p_order = 1 / (1 + np.exp(-(cfg.order_bias + cfg.order_slope * u_order
                                + world.price_utility(users, items))))
    purchased = rng.random(len(items)) < p_order
    return pl.DataFrame(
        {
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "ts": ts.astype(np.int64),
            "event": np.where(purchased, "purchase", "click"),
        }
    )


def _position_in_group(
    g_order: np.ndarray, first: np.ndarray, size: np.ndarray, item: np.ndarray
) -> np.ndarray:
    """Index of each item within its (sorted) group slice of g_order."""
    width = int(size.max(initial=1))
    idx = np.minimum(first[:, None] + np.arange(width)[None, :], len(g_order) - 1)
    hit = (g_order[idx] == item[:, None]) & (np.arange(width)[None, :] < size[:, None])
    return hit.argmax(axis=1)


def generate(cfg: WorldConfig, progress: bool = False) -> tuple[pl.DataFrame, pl.DataFrame, World]:
    """Generate (items, interactions, world) for `cfg`; deterministic in `cfg.seed`."""
    cat = _build_catalog(cfg)
    fav, pref, sensitivity, activity = _build_users(cfg, cat)
    end_ts = cfg.days * DAY_SECONDS
    world = World(
        user_pref=pref,
        price_sensitivity=sensitivity,
        activity=activity.astype(np.float32),
        item_taste=cat.taste,
        item_pop=cat.pop,
        item_leaf=cat.leaf,
        price=cat.price,
        price_ref=cat.price_ref,
        is_new=cat.is_new,
        dup_group=cat.dup_group,
        lookalike_pairs=cat.lookalike_pairs,
        position_bias=(1.0 / np.arange(1, cfg.max_positions + 1) ** cfg.position_decay).astype(
            np.float32
        ),
        temperature=cfg.temperature,
        click_bias=cfg.click_bias,
        order_bias=cfg.order_bias,
        order_slope=cfg.order_slope,
        cancel_rate=cfg.cancel_rate,
        quantity_extra=cfg.quantity_extra,
        cutoff_ts=cfg.cutoff_day * DAY_SECONDS,
        end_ts=end_ts,
        seed=cfg.seed,
    )

    rng = _rng(cfg.seed, 4)
    n_req = 1 + rng.poisson(activity)
    req_user = np.repeat(np.arange(cfg.n_users), n_req)
    req_ts = rng.integers(0, end_ts, size=len(req_user))
    chunks = []
    bounds = range(0, len(req_user), cfg.chunk_requests)
    iterator = bounds
    if progress:
        from rich.progress import track

        iterator = track(bounds, description="logging traffic")
    for c, start in enumerate(iterator):
        stop = start + cfg.chunk_requests
        chunks.append(_log_chunk(cfg, world, fav, req_user[start:stop], req_ts[start:stop], c))
    interactions = (
        pl.concat(chunks)
        .unique(subset=["user_id", "item_id", "ts"], keep="first", maintain_order=True)
        .sort(["user_id", "ts", "item_id"])
    )

    trained = interactions.filter(pl.col("ts") < world.cutoff_ts)["item_id"].unique()
    items = pl.DataFrame(
        {
            "item_id": np.arange(cfg.n_items, dtype=np.int64),
            "content": pl.Series(cat.content).cast(pl.List(pl.Float32)),
            "category": cat.category,
            "price": cat.price.astype(np.float64),
        }
    ).with_columns(is_cold=~pl.col("item_id").is_in(trained.implode()))
    return items, interactions, world


def datacard(cfg: WorldConfig, items: pl.DataFrame, interactions: pl.DataFrame, world: World
             ) -> dict:
    """The data card of a synthetic world: source, seed, config, counts, what is simulated."""
    return {
        "name": "synthetic",
        "source": "quasid built-in synthetic world (quasid.data.synthetic)",
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "counts": counts(items, interactions),
        "cutoff_ts": int(world.cutoff_ts),
        "end_ts": int(world.end_ts),
        "world": world.summary(),
        "real": [],
        "simulated": [
            "everything: category tree, content embeddings, prices, users, logged interactions",
            "ground truth in world.npz: preferences, popularity, price sensitivity, "
            "near-duplicate groups (benign) and look-alike pairs (harmful), new items",
        ],
        "events": {"click": "a logged choice from a slate", "purchase": "a choice that ordered"},
    }


def synthesize(cfg: WorldConfig, out: str | Path, progress: bool = False) -> dict:
    """Generate a world and write it as a dataset folder; returns the data card."""
    items, interactions, world = generate(cfg, progress=progress)
    card = datacard(cfg, items, interactions, world)
    write_dataset(out, items, interactions, card, world)
    return card

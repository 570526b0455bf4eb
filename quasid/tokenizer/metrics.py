"""SID quality: collisions, codebook use, entropy, nearest-SID Hamming distances, and, on the
synthetic world, how often harmful look-alikes and benign near-duplicates end up together.

Definitions (n items, codes C ∈ {0..K-1}^{n×L}):
- collision_rate = 1 − unique_sids / n: the share of items that need a collision_rank > 0;
- sid_entropy = −Σ_s p_s log2 p_s over full SIDs (bits; at most log2 n);
- per level l: utilization = used codes / K, perplexity = exp(−Σ_k q_lk ln q_lk);
  codebook_utilization = the mean utilization over levels;
- nearest_hamming[i] = min_{j≠i} H(C_i, C_j) (0 = a collision); the histogram counts h = 0..L;
- harmful_collision_rate: the share of look-alike pairs with H ≤ 1 (a full SID or all but one
  level shared); benign_collision_rate: the same over near-duplicate pairs
  (`*_full_collision_rate`: H = 0 only).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import polars as pl

from quasid.data.world import World


def _code_frame(codes: np.ndarray) -> pl.DataFrame:
    codes = np.asarray(codes)
    return pl.DataFrame({f"l{k}": codes[:, k].astype(np.int64) for k in range(codes.shape[1])})


def nearest_sid_hamming(codes: np.ndarray) -> np.ndarray:
    """(n,) min Hamming distance from each item's SID to another item's SID.

    Exact without the n × n comparison: i's nearest SID shares the largest set S of levels
    with i, and a set S is shared with some other item iff the group of items agreeing with
    i on S has at least 2 members. One window count per non-empty subset of levels
    (2^L − 1 of them), so it scales to millions of items.
    """
    codes = np.asarray(codes)
    n, levels = codes.shape
    if n < 2:
        return np.full(n, levels, dtype=np.int64)
    names = [f"l{k}" for k in range(levels)]
    shared = [
        pl.when(pl.len().over(list(subset)) >= 2).then(size).otherwise(0)
        for size in range(1, levels + 1) for subset in combinations(names, size)
    ]
    best = _code_frame(codes).select(pl.max_horizontal(shared).alias("best"))["best"]
    return levels - best.to_numpy().astype(np.int64)


def pair_hamming(codes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Hamming distance of each (row_a, row_b) pair, (n_pairs,) int64."""
    codes = np.asarray(codes)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return (codes[pairs[:, 0]] != codes[pairs[:, 1]]).sum(axis=1).astype(np.int64)


def level_stats(codes: np.ndarray, codebook_size: int) -> tuple[list[float], list[float]]:
    """(utilization, perplexity) per level."""
    codes = np.asarray(codes)
    util, perp = [], []
    for level in range(codes.shape[1]):
        count = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        q = count / max(count.sum(), 1.0)
        nz = q[q > 0]
        util.append(float((count > 0).sum() / codebook_size))
        perp.append(float(np.exp(-(nz * np.log(nz)).sum())))
    return util, perp


def sid_entropy(codes: np.ndarray) -> float:
    """Entropy of the full-SID distribution in bits."""
    sizes = _code_frame(codes).group_by(pl.all()).len()["len"].to_numpy().astype(np.float64)
    p = sizes / sizes.sum()
    return float(-(p * np.log2(p)).sum())


def _world_rows(world: World, item_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Map world item ids (positions) in `pairs` to rows of `item_ids`."""
    row_of = np.full(max(world.n_items, int(item_ids.max()) + 1), -1, dtype=np.int64)
    row_of[item_ids] = np.arange(len(item_ids))
    rows = row_of[pairs]
    if (rows < 0).any():
        missing = pairs[(rows < 0)][:5].tolist()
        raise ValueError(f"sid_metrics: world pairs name items absent from the SID codes, "
                         f"e.g. {missing}")
    return rows


def sid_metrics(codes: np.ndarray, codebook_size: int, item_ids: np.ndarray | None = None,
                world: World | None = None) -> dict:
    """All SID quality metrics of `codes` (row k = `item_ids[k]`, default k), JSON-ready."""
    codes = np.asarray(codes, dtype=np.int64)
    n, levels = codes.shape
    if n == 0:
        raise ValueError("sid_metrics: no items (codes has 0 rows)")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"sid_metrics: codes must lie in [0, {codebook_size}), got "
                         f"[{codes.min()}, {codes.max()}]")
    item_ids = np.arange(n) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    unique = int(_code_frame(codes).n_unique())
    util, perp = level_stats(codes, codebook_size)
    nearest = nearest_sid_hamming(codes)
    out = {
        "n_items": int(n),
        "levels": int(levels),
        "codebook_size": int(codebook_size),
        "collision_rate": float(1.0 - unique / n),
        "unique_sids": unique,
        "sid_entropy": sid_entropy(codes),
        "sid_entropy_max": float(np.log2(n)),
        "codebook_utilization": float(np.mean(util)),
        "codebook_utilization_per_level": util,
        "perplexity_per_level": perp,
        "nearest_hamming_hist": np.bincount(nearest, minlength=levels + 1).tolist(),
        "items_colliding": float((nearest == 0).mean()),
    }
    if world is not None:
        for label, pairs in (("harmful", world.lookalike_pairs), ("benign", world.benign_pairs())):
            h = pair_hamming(codes, _world_rows(world, item_ids, pairs)) if len(pairs) else None
            out[f"{label}_pairs"] = int(len(pairs))
            out[f"{label}_collision_rate"] = float((h <= 1).mean()) if h is not None else 0.0
            out[f"{label}_full_collision_rate"] = float((h == 0).mean()) if h is not None else 0.0
    return out

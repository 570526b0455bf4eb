"""Offline ranking metrics: HR@K and NDCG@K with one relevant item per request.

HR@K = [rank < K] and NDCG@K = [rank < K] / log2(rank + 2), rank 0-based; the benchmark's
and the stack's validation-time weight fit use the same function.
"""

from __future__ import annotations

import numpy as np

KS = (5, 10)


def hit_ndcg(ranked: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = KS
             ) -> dict[str, np.ndarray]:
    """Per-request HR@k and NDCG@k of ranked item ids (n, >= max k) against one target each (n,)."""
    ranked, targets = np.asarray(ranked), np.asarray(targets)
    if ranked.ndim != 2 or len(ranked) != len(targets) or ranked.shape[1] < max(ks):
        raise ValueError(f"ranked {ranked.shape} / targets {targets.shape}: expected (n, >= {max(ks)}) "
                         "and (n,)")
    match = ranked[:, : max(ks)] == targets[:, None]
    rank = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)
    return out

"""Offline evaluation: leave-one-out HR@K and NDCG@K over the full item set (the TIGER protocol).

Per user, the last interaction is the test target and everything before it (at most the
model's history length) the request. Cold items' interactions are dropped from training
only (`leave_one_out(cold_items=...)`), so a cold item can be a test target; the `cold`
segment is the requests whose target is a cold item. Both the full stack's slates
(retriever -> ranker) and the retriever's beam alone (ordered by log p, as TIGER reports)
are scored. With one relevant item per request, HR@K = [rank < K] and
NDCG@K = [rank < K] / log2(rank + 2) (rank 0-based).

`offline_eval` runs tokenizers x seeds: train the tokenizer (`quasid.training.train_tokenizer`),
train a stack on the leave-one-out training part, evaluate, and aggregate mean and standard
deviation over seeds into `results.json` and `results.md`. Each run's metrics are cached in
`out/runs/<tokenizer>/seed<k>/metrics.json` (reused when the settings match), and runs can
go in parallel processes sharing one GPU (`jobs`).
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

"""The pair terms (CVPM + HaMR, uniform repulsion, AdaSID, InfoNCE's candidates) on the
batch's sparse pair sets: the CPU path of `SIDModel.losses`.

The formulas are those of `quasid.tokenizer.losses`; there each term is a B × B tensor
expression, and on the CPU its temporaries, not its arithmetic, cost the time (issue 18).
But every margin term is nonzero only on a sparse set of pairs:
- HaMR and uniform repulsion on pairs within Hamming distance h (sharing ≥ L − h levels);
- AdaSID on pairs sharing their first code (p_ij ≥ 1).
Those pairs are found by grouping the rows on their codes (sorts, O(B log B) plus the pairs
found), and the hinge, its weight and its gradient are evaluated on them alone
(`pair_hinge`). CVPM's near-duplicate count is over every pair, but near-duplicates are a
property of the fixed content: the batch sampler finds them once per fit and lists a
batch's like its positives; without that list, one content-cosine GEMM row block by row
block, each block counted and dropped (`cosine_scan`), finds them.

Pairs are unordered: (m, 2) int64 batch positions i < j, sorted by (i, j). Every term is
symmetric in (i, j), so a sum over the B² ordered pairs of the dense formulas is twice the
sum over the unordered ones; the values equal the dense ones up to float summation order.
The pair sets have data-dependent sizes (host synchronizations, dynamic shapes), so
accelerators keep the dense static-shape formulas (CUDA graphs, `torch.compile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from quasid.tokenizer.pairs import ranges, sort_pairs

_EPS = 1e-8  # as `quasid.tokenizer.losses`: d_ij = sqrt(2 − 2⟨ẑ_i, ẑ_j⟩ + ε)
SCAN_BLOCK = 1 << 18
"""Content-cosine elements per block of `cosine_scan` (1 MiB of fp32: stays in L2)."""
HINGE_CHUNK = 1 << 16
"""Pairs per chunk of `pair_hinge` (bounds its gathered rows however many pairs qualify)."""


def equal_key_pairs(keys: torch.Tensor) -> torch.Tensor:
    """Unordered pairs (i < j) of rows with equal keys: (m, 2) int64, sorted by (i, j)."""
    b = keys.shape[0]
    order = torch.argsort(keys, stable=True)  # stable: positions ascend within a group
    ordered = keys[order]
    first = torch.ones(b, dtype=torch.bool, device=keys.device)
    first[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(first, 0) - 1
    starts = torch.nonzero(first).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([b])])
    # sorted position p pairs with the later members of its group, p + 1 .. end − 1
    src, offset = ranges(ends[group] - torch.arange(b, device=keys.device) - 1)
    return sort_pairs(order[src], order[src + 1 + offset], b)


def group_ids(codes: torch.Tensor, levels) -> torch.Tensor:
    """(B,) int64 ids in [0, B), equal exactly when two rows agree on every level in `levels`."""
    # one level at a time, re-ranked after each so the key stays below B·K (no overflow);
    # a 1-D unique sorts, `unique(dim=0)` compares row by row on the CPU (far slower)
    ids = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    span = int(codes.max()) + 1 if codes.numel() else 1
    for level in levels:
        ids = torch.unique(ids * span + codes[:, level], return_inverse=True)[1]
    return ids


def pair_hamming(codes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """H of each pair: (m,) int64 number of levels on which its two rows differ."""
    return (codes[pairs[:, 0]] != codes[pairs[:, 1]]).sum(dim=1)


def close_pairs(codes: torch.Tensor, max_hamming: int) -> torch.Tensor:
    """Unordered pairs within Hamming distance `max_hamming`, i.e. agreeing on at least
    L − max_hamming levels: the union over those level subsets of the equal-code groups."""
    b, levels = codes.shape
    agree = levels - max_hamming
    if agree <= 0:  # every pair qualifies
        return torch.triu_indices(b, b, 1, device=codes.device).T.contiguous()
    found = [equal_key_pairs(group_ids(codes, subset))
             for subset in combinations(range(levels), agree)]
    if len(found) == 1:
        return found[0]
    # a pair agreeing on more levels is found under several subsets: keep it once
    keys = torch.unique(torch.cat([p[:, 0] * b + p[:, 1] for p in found]))
    return torch.stack([keys // b, keys % b], dim=1)


def pairs_in(pairs: torch.Tensor, table: torch.Tensor, b: int) -> torch.Tensor:
    """(m,) bool: whether each pair of `pairs` is in `table` (both sorted unordered pairs)."""
    if table.shape[0] == 0:
        return torch.zeros(pairs.shape[0], dtype=torch.bool, device=pairs.device)
    keys = table[:, 0] * b + table[:, 1]
    query = pairs[:, 0] * b + pairs[:, 1]
    pos = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
    return keys[pos] == query


def cosine_scan(unit: torch.Tensor, probes: torch.Tensor, threshold: float,
                block: int = SCAN_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of ordered pairs (i, j) of all B² with ⟨u_i, u_j⟩ > threshold, the cosines at
    the `probes` (m, 2) pairs), from the GEMM `unit @ unit.T` one row block at a time.

    The probes' cosines come from the same GEMM values the count reads, so a pair is never
    counted on one side of the threshold and masked on the other.
    """
    b = unit.shape[0]
    rows = max(1, block // b)
    order = torch.argsort(probes[:, 0], stable=True)
    first, second = probes[order, 0], probes[order, 1]
    starts = torch.arange(0, b + rows, rows, device=unit.device).clamp_max(b)
    edges = torch.searchsorted(first, starts).tolist()
    above = torch.zeros((), dtype=torch.int64, device=unit.device)
    values = torch.empty(probes.shape[0], dtype=unit.dtype, device=unit.device)
    for k, s in enumerate(range(0, b, rows)):
        cos = unit[s:s + rows] @ unit.T
        above += (cos > threshold).sum()
        lo, hi = edges[k], edges[k + 1]
        values[order[lo:hi]] = cos[first[lo:hi] - s, second[lo:hi]]
    return above, values


class _PairHinge(torch.autograd.Function):
    """Σ_k w_k · max(0, m_k − d_k)² over pairs k = (i, j), d_k = sqrt(max(0, 2 − 2⟨u_i, u_j⟩) + ε),
    with its gradient in `unit` computed in the same chunked pass (nothing per pair kept)."""

    @staticmethod
    def forward(ctx, unit, pairs, weight, margin):
        total = unit.new_zeros(())
        grad = torch.zeros_like(unit)
        for s in range(0, pairs.shape[0], HINGE_CHUNK):
            i, j = pairs[s:s + HINGE_CHUNK, 0], pairs[s:s + HINGE_CHUNK, 1]
            w, m = weight[s:s + HINGE_CHUNK], margin[s:s + HINGE_CHUNK]
            ui, uj = unit[i], unit[j]
            sq = 2.0 - 2.0 * (ui * uj).sum(dim=1)
            d = torch.sqrt(sq.clamp_min(0.0) + _EPS)
            hinge = F.relu(m - d)
            total = total + (w * hinge.pow(2)).sum()
            # dL/d⟨u_i, u_j⟩ = 2 w h / d where the clamp passes (sq ≥ 0), as autograd of the
            # dense formula; h = 0 outside the margin, so ReLU's zero gradient there holds
            coef = torch.where(sq >= 0.0, 2.0 * w * hinge / d, torch.zeros_like(d))[:, None]
            grad.index_add_(0, i, coef * uj)
            grad.index_add_(0, j, coef * ui)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None


def pair_hinge(unit: torch.Tensor, pairs: torch.Tensor, weight: torch.Tensor,
               margin: torch.Tensor | float) -> torch.Tensor:
    """Σ_k weight_k · max(0, margin_k − d_k)² over the (m, 2) `pairs` of rows of `unit` (unit
    vectors), d_k = ‖u_i − u_j‖ as `losses.unit_distances`; differentiable in `unit` only
    (weights and margins are constants, as the dense terms' masks and code-derived weights)."""
    margin = torch.as_tensor(margin, dtype=unit.dtype, device=unit.device).expand(
        pairs.shape[0])
    return _PairHinge.apply(unit, pairs, weight.to(unit.dtype), margin)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # fp32 as the dense formulas' `.float()`, but float64 stays float64 (exact tests)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unit_latent(z: torch.Tensor) -> torch.Tensor:
    """ẑ = z / ‖z‖ in fp32, or float64 for float64 z (as `losses.unit_distances`)."""
    return F.normalize(_at_least_fp32(z), dim=1, eps=_EPS)


@dataclass(frozen=True)
class CVPMPairs:
    """CVPM's valid pairs (unordered, with their Hamming distances) and the ordered-pair
    counts each reason excluded, in `losses.CVPM_REASONS` order: `excluded.sum()` +
    2 · len(pairs) == B², as the dense mask's."""

    pairs: torch.Tensor
    hamming: torch.Tensor
    excluded: torch.Tensor


def cvpm_pairs(item_ids: torch.Tensor, codes: torch.Tensor, close: torch.Tensor,
               close_hamming: torch.Tensor, unit: torch.Tensor, positive: torch.Tensor,
               tau_dup: float, h_max: int, near: torch.Tensor | None = None,
               block: int = SCAN_BLOCK) -> CVPMPairs:
    """CVPM (`losses.cvpm_mask`) on the sparse pairs.

    `close` (unordered pairs with H ≤ some h ≥ h_max, e.g. `close_pairs(codes, h_max)`) and
    their `close_hamming`; `unit` the L2-normalized content rows; `positive` the batch's
    unordered positive pairs; `near` its unordered near-duplicate pairs of distinct items
    (cos > τ_dup; `BatchSampler(near_duplicate=τ_dup)` lists them) or None to find them with
    a `cosine_scan` of all pairs. The valid pairs are the close ones with H ≤ h_max that are
    not the same item, not positives and not near-duplicates. The exclusion counts follow the
    first-match order self, same_item, collaborative, near_duplicate, far: the
    near-duplicates counted are those that are not positives (positives never pair an item
    with itself), and `far` the rest.
    """
    b = item_ids.shape[0]
    close = close[close_hamming <= h_max]
    ham = close_hamming[close_hamming <= h_max]
    same = equal_key_pairs(item_ids)
    if near is not None:
        n_near = 2 * (~pairs_in(near, positive, b)).sum()
        is_near = pairs_in(close, near, b)
    else:
        diagonal = torch.arange(b, device=item_ids.device)[:, None].expand(b, 2)
        probes = torch.cat([diagonal, same, positive, close])
        above, cos = cosine_scan(unit, probes, tau_dup, block)
        cos_self, cos_same, cos_pos, cos_close = torch.split(
            cos, [b, same.shape[0], positive.shape[0], close.shape[0]])
        # the scan counts every ordered pair above τ_dup: drop those an earlier reason took
        n_near = above - (cos_self > tau_dup).sum() \
            - 2 * ((cos_same > tau_dup).sum() + (cos_pos > tau_dup).sum())
        is_near = cos_close > tau_dup
    keep = (item_ids[close[:, 0]] != item_ids[close[:, 1]]) & ~pairs_in(close, positive, b) \
        & ~is_near
    n_same, n_pos, n_valid = (2 * same.shape[0], 2 * positive.shape[0],
                              2 * int(keep.sum()))
    far = b * b - b - n_same - n_pos - n_near - n_valid
    excluded = torch.stack([n_near.new_tensor(b), n_near.new_tensor(n_same),
                            n_near.new_tensor(n_pos), n_near, far])
    return CVPMPairs(pairs=close[keep], hamming=ham[keep], excluded=excluded)


def hamr_loss(unit: torch.Tensor, cv: CVPMPairs, levels: int, margin: float,
              gamma: float) -> torch.Tensor:
    """HaMR (`losses.hamr_loss`) over CVPM's valid pairs: (1/B) Σ_ij M_ij s^γ max(0,
    m₀(1 + s) − d_ij)², twice the unordered sum."""
    s = 1.0 - cv.hamming.to(unit.dtype) / levels
    return 2.0 * pair_hinge(unit, cv.pairs, s.pow(gamma), margin * (1.0 + s)) / unit.shape[0]


def uniform_loss(unit: torch.Tensor, pairs: torch.Tensor, margin: float) -> torch.Tensor:
    """Uniform repulsion (`losses.uniform_repulsion_loss`) over its pairs U (unordered,
    distinct items, H ≤ h_u): (1/B) Σ_ij U_ij max(0, m − d_ij)²."""
    weight = torch.ones(pairs.shape[0], dtype=unit.dtype, device=unit.device)
    return 2.0 * pair_hinge(unit, pairs, weight, margin) / unit.shape[0]


def adasid_pairs(item_ids: torch.Tensor, codes: torch.Tensor, content_unit: torch.Tensor,
                 positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, W): AdaSID's weighted pairs (`losses.adasid_weights`), the unordered pairs of
    distinct items sharing their first code, W = (1 − c_ij) · load_ij with c_ij =
    max(P_ij, max(0, cos_ij)) and load_ij = n_i(p_ij) / B."""
    b, levels = codes.shape
    pairs = equal_key_pairs(codes[:, 0])
    pairs = pairs[item_ids[pairs[:, 0]] != item_ids[pairs[:, 1]]]
    i, j = pairs[:, 0], pairs[:, 1]
    prefix = (codes[i] == codes[j]).long().cumprod(dim=1).sum(dim=1)  # ≥ 1 by construction
    # crowd[p − 1, r] = how many rows share row r's first p codes (itself included)
    crowd = torch.stack([torch.bincount(g, minlength=b)[g]
                         for g in (group_ids(codes, range(p)) for p in range(1, levels + 1))])
    content_unit = _at_least_fp32(content_unit)
    load = crowd[prefix - 1, i].to(content_unit.dtype) / b
    cos = (content_unit[i] * content_unit[j]).sum(dim=1)
    compat = torch.maximum(pairs_in(pairs, positive, b).to(cos.dtype), cos.clamp_min(0.0))
    return pairs, (1.0 - compat) * load


def adasid_loss(unit: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, rho,
                margin: float) -> torch.Tensor:
    """AdaSID regulation (`losses.adasid_loss`): ρ Σ_ij W_ij max(0, m − d_ij)² / max(ε, Σ W),
    both sums twice the unordered ones."""
    return rho * (2.0 * pair_hinge(unit, pairs, weights, margin)) \
        / (2.0 * weights.sum()).clamp_min(_EPS)


def contrastive_allowed(rows: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor
                        ) -> torch.Tensor:
    """InfoNCE's candidate mask (A, B): not the anchor's item, not one of its positives
    (`positive` the batch's unordered positive pairs); the target is added by `info_nce`."""
    allowed = rows[anchor][:, None] != rows[None, :]
    slot = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=rows.device)
    slot[anchor] = torch.arange(anchor.shape[0], device=rows.device)
    both = torch.cat([positive, positive.flip(1)])
    both = both[slot[both[:, 0]] >= 0]
    allowed[slot[both[:, 0]], both[:, 1]] = False
    return allowed

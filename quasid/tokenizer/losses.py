"""The tokenizers' losses and pair masks, each vectorized over the batch (B x B, no pair loops).

These dense formulas run on accelerators (static shapes); on the CPU `SIDModel.losses` uses
`quasid.tokenizer.pair_terms`, the same terms on the sparse pairs where they are nonzero.

Notation (one batch of B rows): content x, encoder latent z, unit latent ẑ = z / ‖z‖,
codes C ∈ {0..K-1}^{B×L}, Hamming distance H_ij = Σ_l [C_il ≠ C_jl], shared share
s_ij = 1 − H_ij / L, latent distance d_ij = ‖ẑ_i − ẑ_j‖ ∈ [0, 2], and P_ij = 1 when items
i and j are collaborative positives (co-interacted within a window of the training logs).
Codes and masks never carry gradient: the margin terms push through z only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CVPM_REASONS = ("self", "same_item", "collaborative", "near_duplicate", "far")
"""Why CVPM drops a pair, in the order reasons are attributed (first match wins)."""

_EPS = 1e-8


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_rec = (1/B) Σ_i ‖x̂_i − x_i‖².

    The tokenizer standardizes content so that the mean ‖x‖² is 1: L_rec is then the share
    of the content's variance the reconstruction misses.
    """
    return (x_hat.float() - x.float()).pow(2).sum(dim=1).mean()


def rq_loss(residuals: list[torch.Tensor], codewords: list[torch.Tensor], beta: float,
            codebook_term: bool = True) -> torch.Tensor:
    """L_rq = Σ_l (1/B) Σ_i [ ‖sg(r_il) − e_il‖² + β ‖r_il − sg(e_il)‖² ].

    r_il is row i's residual entering level l and e_il the codeword it was assigned there;
    sg stops the gradient. The first (codebook) term is dropped with `codebook_term=False`,
    for codebooks updated by EMA instead of by gradient.
    """
    total = residuals[0].new_zeros(())
    for r, e in zip(residuals, codewords):
        commit = (r - e.detach()).pow(2).sum(dim=1).mean()
        total = total + beta * commit
        if codebook_term:
            total = total + (r.detach() - e).pow(2).sum(dim=1).mean()
    return total


def hamming(codes: torch.Tensor) -> torch.Tensor:
    """H_ij = Σ_l [C_il ≠ C_jl]: (B, L) integer codes -> (B, B) int32 Hamming distances."""
    ham = torch.zeros((codes.shape[0], codes.shape[0]), dtype=torch.int32, device=codes.device)
    for level in range(codes.shape[1]):
        ham += codes[:, None, level] != codes[None, :, level]
    return ham


def shared_prefix(codes: torch.Tensor) -> torch.Tensor:
    """p_ij = the number of leading levels on which rows i and j agree, (B, B) int64."""
    # one B x B comparison per level (a cumprod over a (B, B, L) tensor is far slower on CUDA)
    run = torch.ones((codes.shape[0], codes.shape[0]), dtype=torch.bool, device=codes.device)
    prefix = torch.zeros(run.shape, dtype=torch.int64, device=codes.device)
    for level in range(codes.shape[1]):
        run = run & (codes[:, None, level] == codes[None, :, level])
        prefix += run
    return prefix



def unit_distances(z: torch.Tensor) -> torch.Tensor:
    """d_ij = ‖ẑ_i − ẑ_j‖, ẑ = z / ‖z‖, as sqrt(2 − 2⟨ẑ_i, ẑ_j⟩ + ε) (d = 0 keeps a gradient)."""
    unit = F.normalize(z.float(), dim=1, eps=_EPS)
    sq = (2.0 - 2.0 * unit @ unit.T).clamp_min(0.0)
    return torch.sqrt(sq + _EPS)


@dataclass(frozen=True)
class CVPMResult:
    """The valid-pair mask and how many ordered pairs each reason excluded.

    `excluded[k]` counts the ordered pairs (i, j) dropped for `CVPM_REASONS[k]`, each pair
    attributed to the first reason that applies, so `excluded.sum() + mask.sum() == B²`.
    Counts stay on the device (a tensor) so logging them costs no synchronization per step.
    """

    mask: torch.Tensor
    excluded: torch.Tensor

    def counts(self) -> dict[str, int]:
        """`{reason: excluded ordered pairs}` as Python ints (synchronizes)."""
        return dict(zip(CVPM_REASONS, (int(v) for v in self.excluded.tolist())))


def cvpm_mask(item_ids: torch.Tensor, ham: torch.Tensor, content_cos: torch.Tensor,
              positive: torch.Tensor, tau_dup: float, h_max: int) -> CVPMResult:
    """CVPM, conflict-aware valid-pair masking.

    M_ij = [i ≠ j] · [item_i ≠ item_j] · (1 − P_ij) · [cos(x_i, x_j) ≤ τ_dup] · [H_ij ≤ h_max]

    item_ids (B,), ham (B, B) Hamming distances of the current codes (`hamming`),
    content_cos (B, B) content cosines, positive (B, B) bool P_ij. Only the pairs left,
    whose overlap is a qualified conflict, are repelled.
    """
    b = item_ids.shape[0]
    reasons = (
        torch.eye(b, dtype=torch.bool, device=item_ids.device),
        item_ids[:, None] == item_ids[None, :],
        positive,
        content_cos > tau_dup,
        ham > h_max,
    )
    valid = torch.ones((b, b), dtype=torch.bool, device=item_ids.device)
    excluded = []
    for reason in reasons:
        excluded.append((reason & valid).sum())  # attributed to the first reason that applies
        valid = valid & ~reason
    return CVPMResult(mask=valid, excluded=torch.stack(excluded))


def hamr_loss(z: torch.Tensor, ham: torch.Tensor, levels: int, mask: torch.Tensor,
              margin: float = 0.5, gamma: float = 1.0) -> torch.Tensor:
    """HaMR, Hamming-guided margin repulsion.

    HaMR = (1/B) Σ_ij M_ij · w(s_ij) · max(0, m(s_ij) − d_ij)²,
    m(s) = m₀ · (1 + s), w(s) = s^γ, s_ij = 1 − H_ij / L, d_ij = ‖ẑ_i − ẑ_j‖.

    A full collision (s = 1) gets the widest margin 2·m₀ and weight 1; each differing level
    narrows the margin and lowers the weight; a pair sharing no level (s = 0) has weight 0.
    `ham` holds H of the current codes (no gradient), `mask` the CVPM mask M (with H ≤ h_max).
    Normalized per row (B), not per valid pair (the reference's max(1, Σ M)): with the
    pair count as denominator each conflict's push shrinks as more pairs qualify, so a
    finer mask (near-collisions too) weakens every push, and the last few collisions in a
    batch get an outsized one; per row, each conflict is pushed alike whatever the rest.
    """
    s = 1.0 - ham.float() / levels
    hinge = F.relu(margin * (1.0 + s) - unit_distances(z))
    weight = torch.where(mask, s.pow(gamma), torch.zeros_like(s))
    return (weight * hinge.pow(2)).sum() / z.shape[0]


def uniform_repulsion_loss(z: torch.Tensor, mask: torch.Tensor, margin: float = 1.0
                           ) -> torch.Tensor:
    """Uniform repulsion: every collision pushed alike (the no-qualification ablation).

    L_uni = (1/B) Σ_ij U_ij · max(0, m − d_ij)² (normalized as HaMR), with U = [i ≠ j] ·
    [item_i ≠ item_j] · [H_ij ≤ h_u]: no collaborative or duplicate exclusions, no severity
    scaling. The tokenizer's default h_u = 0 (pairs sharing the full SID: collisions) and
    m = 2·m₀ (HaMR's full-collision margin).
    """
    hinge = F.relu(margin - unit_distances(z))
    return torch.where(mask, hinge.pow(2), torch.zeros_like(hinge)).sum() / z.shape[0]


def adasid_weights(codes: torch.Tensor, content_cos: torch.Tensor, positive: torch.Tensor,
                   base_mask: torch.Tensor) -> torch.Tensor:
    """AdaSID's per-pair regulation weight (before the training-progress schedule).

    W_ij = A_ij · [p_ij ≥ 1] · (1 − c_ij) · load_ij, where A is `base_mask` ([i ≠ j] ·
    [item_i ≠ item_j]), p_ij the shared code prefix length, c_ij = max(P_ij, max(0, cos_ij))
    the compatibility (collaborative or content), and load_ij = n_i(p_ij) / B the share of the
    batch whose first p_ij codes equal i's (how crowded the shared code region is).
    """
    b = codes.shape[0]
    prefix = shared_prefix(codes)
    levels = codes.shape[1]
    # crowd[p, i] = how many rows share row i's first p codes (p = 0: everyone)
    crowd = torch.stack([(prefix >= p).sum(dim=1) for p in range(levels + 1)])
    load = torch.gather(crowd, 0, prefix.T.contiguous()).T.float() / b
    compat = torch.maximum(positive.float(), content_cos.float().clamp_min(0.0))
    overlap = base_mask & (prefix >= 1)
    return overlap.float() * (1.0 - compat) * load


def adasid_schedule(progress, rho_end: float = 0.1):
    """ρ(t) = ρ_end + (1 − ρ_end)(1 − t), t ∈ [0, 1] the share of training done (a float or a
    0-d tensor).

    The regulation's weight moves from 1 at the start to ρ_end at the end, leaving the
    reconstruction (alignment with the content) in charge late in training.
    """
    return rho_end + (1.0 - rho_end) * (1.0 - progress)


def adasid_loss(z: torch.Tensor, weights: torch.Tensor, rho, margin: float = 1.0
                ) -> torch.Tensor:
    """AdaSID regulation = ρ(t) · Σ_ij W_ij · max(0, m − d_ij)² / max(ε, Σ_ij W_ij).

    A W-weighted mean of the squared hinge, so crowded, incompatible overlaps dominate. `rho`
    may be a 0-d tensor (a CUDA graph's float64 progress): it is rounded to the hinge's dtype
    as a Python float is, so the term stays fp32 and equal to the float's.
    """
    hinge = F.relu(margin - unit_distances(z))
    if isinstance(rho, torch.Tensor):  # a 0-d float64 would promote the 0-d sums to float64
        rho = rho.to(hinge.dtype)
    return rho * (weights * hinge.pow(2)).sum() / weights.sum().clamp_min(_EPS)


def info_nce(f: torch.Tensor, g: torch.Tensor, anchor: torch.Tensor, target: torch.Tensor,
             allowed: torch.Tensor, weight: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Dual-tower InfoNCE with in-batch negatives.

    For each pair k (anchor a_k, positive t_k), with f̂, ĝ the L2-normalized tower outputs:
      ℓ_k = −log exp(⟨f̂_{a_k}, ĝ_{t_k}⟩/τ) / Σ_{j: allowed_kj} exp(⟨f̂_{a_k}, ĝ_j⟩/τ)
    loss = Σ_k weight_k ℓ_k / max(1, Σ_k weight_k).

    f, g (B, p) tower outputs; anchor, target (A,) row indices; allowed (A, B) bool candidate
    mask (t_k is always allowed; drop a_k itself, copies of its item and its other positives);
    weight (A,) 0/1, so a fixed-shape batch can carry pairs without a positive.
    """
    fa = F.normalize(f.float(), dim=1, eps=_EPS)[anchor]
    gu = F.normalize(g.float(), dim=1, eps=_EPS)
    logits = (fa @ gu.T) / tau
    # the target always counts, so no row is all -inf (a NaN even at weight 0)
    columns = torch.arange(gu.shape[0], device=target.device)
    allowed = allowed | (columns[None, :] == target[:, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    losses = F.cross_entropy(logits, target, reduction="none")
    weight = weight.float()
    return (weight * losses).sum() / weight.sum().clamp_min(1.0)

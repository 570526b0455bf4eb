"""Training batches that put useful pairs together.

A random batch rarely holds the pairs the qualification is about: in a catalog of N items a
given look-alike partner lands in a batch of B with probability B/N, and most in-batch pairs
share no code at all. So a batch is four blocks of A = B/4 rows: A anchors (every item once
per epoch, in a seeded random order) and, for each anchor, three partners:
- a collaborative positive (co-interacted in the training logs), the contrastive target;
  an anchor without one gets a second content neighbour instead (and no contrastive term);
- one of its `neighbours` nearest items by content cosine. Harmful look-alikes (content
  cosine 0.90-0.97 in the synthetic world, each other's nearest neighbour) and
  near-duplicates (~0.99) are content neighbours, so they meet in batches: CVPM decides
  which overlaps are conflicts, HaMR repels those, and for the contrastive term they are
  the hard in-batch negatives of the anchor (an item with a disjoint audience next to it).
  With a `ConflictRule` (conflict mining) the neighbour is drawn among those the
  tokenizer's repulsion would act on under the last epoch's codes, when the anchor has any:
  a drawn partner is otherwise a live conflict only some of the time (a look-alike pair met
  about once per epoch and HaMR acted on a third of those meetings);
- the item next to it in the lexicographic order of the current SIDs (refreshed after each
  epoch's evaluation), i.e. the item sharing the longest code prefix: an actual collision
  or near-collision, whatever the content says.
Items may appear twice in a batch (CVPM masks the pair). Shapes are fixed (B rows, A
contrastive pairs with 0/1 weights). All draws come from one CPU `torch.Generator`, so a
seed gives the same batches on every device: `BatchSampler.draw` makes them (the host's whole
share of a batch), `assemble` turns a draw into a batch with device operations alone (what a
CUDA graph captures), `batch` does both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quasid.tokenizer.pairs import PairIndex, pair_mask


@dataclass(frozen=True)
class ConflictRule:
    """Which content neighbours are current conflicts of an anchor, for conflict mining.

    A neighbour j of anchor i is one when H(C_i, C_j) <= h_max, its content cosine is at most
    tau_dup (> 1: no duplicate rule) and, with exempt_positives, the pair is no collaborative
    positive: HaMR's CVPM mask (`ConflictRule(h_max, tau_dup, True)`) or uniform's
    (`ConflictRule(h_u)`), evaluated on the codes of the last epoch.
    """

    h_max: int
    tau_dup: float = 2.0
    exempt_positives: bool = False


@dataclass
class Batch:
    """One training batch on the device: rows into the fit items and what the losses need."""

    rows: torch.Tensor  # (B,) int64 item rows (duplicates possible)
    x: torch.Tensor  # (B, d) standardized content
    unit: torch.Tensor  # (B, d) L2-normalized raw content (for content cosines)
    positive: torch.Tensor | None  # (B, B) bool collaborative-positive mask P (dense path)
    anchor: torch.Tensor  # (A,) contrastive anchor positions in the batch
    target: torch.Tensor  # (A,) their partners' positions
    pair_weight: torch.Tensor  # (A,) 1.0 where the partner is a collaborative positive
    positive_pairs: torch.Tensor | None = None  # (m, 2) unordered positions i < j with P_ij
    near_pairs: torch.Tensor | None = None  # (m, 2) i < j, distinct items, content cos > τ_dup

    def positive_mask(self) -> torch.Tensor | None:
        """P as the (B, B) bool mask the dense formulas read: `positive` when the batch carries
        it (accelerators), else built from `positive_pairs` (CPU); None without either."""
        if self.positive is not None or self.positive_pairs is None:
            return self.positive
        return pair_mask(self.positive_pairs, self.rows.shape[0])


def content_neighbours(unit: torch.Tensor, k: int, chunk: int = 4096, above: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, k) rows of each row's k nearest other rows by cosine (`unit` rows L2-normalized), and
    with `above` the (m, 2) row pairs (a < b) whose cosine exceeds it (else None), CPU."""
    n = unit.shape[0]
    k = max(1, min(k, n - 1))
    out, close = [], []
    for start in range(0, n, chunk):
        sims = unit[start:start + chunk].float() @ unit.float().T
        own = torch.arange(start, min(start + chunk, n), device=unit.device)
        sims[own - start, own] = float("-inf")
        out.append(sims.topk(k, dim=1).indices.cpu())
        if above is not None:  # the same similarities, so no second N x N pass
            found = torch.nonzero(sims > above).cpu()
            found[:, 0] += start
            close.append(found[found[:, 0] < found[:, 1]])
    return torch.cat(out), (torch.cat(close) if above is not None else None)


def lexicographic_partner(codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N,) for each row, its neighbour in SID order sharing the longer code prefix (ties drawn)."""
    codes = codes.cpu()
    n = codes.shape[0]
    order = torch.arange(n)
    for level in reversed(range(codes.shape[1])):
        order = order[torch.argsort(codes[order, level], stable=True)]
    ordered = codes[order]

    def prefix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a == b).long().cumprod(dim=1).sum(dim=1)

    prev_pos = (torch.arange(n) - 1).clamp_min(0)
    next_pos = (torch.arange(n) + 1).clamp_max(n - 1)
    p_prev = torch.where(torch.arange(n) > 0, prefix(ordered, ordered[prev_pos]), -1)
    p_next = torch.where(torch.arange(n) < n - 1, prefix(ordered, ordered[next_pos]), -1)
    coin = torch.rand(n, generator=generator) < 0.5
    take_prev = (p_prev > p_next) | ((p_prev == p_next) & coin)
    pos = torch.where(take_prev, prev_pos, next_pos)
    partner = torch.empty(n, dtype=torch.int64)
    partner[order] = order[pos]
    return partner


def conflict_neighbours(codes: torch.Tensor, knn: torch.Tensor, knn_cos: torch.Tensor,
                        pairs: PairIndex, rule: ConflictRule) -> torch.Tensor:
    """(N, k) bool: whether each content neighbour knn[i, t] is a conflict of i under `rule`
    (codes (N, L) of all items, knn_cos the neighbours' content cosines)."""
    ham = (codes[:, None, :] != codes[knn]).sum(dim=2)
    live = ham <= rule.h_max
    if rule.tau_dup <= 1:
        live &= knn_cos <= rule.tau_dup
    if rule.exempt_positives:
        rows = torch.arange(knn.shape[0])[:, None].expand_as(knn)
        live &= ~pairs.contains(rows, knn.cpu())  # on the CPU, where the codes are
    return live


def to_device(values: torch.Tensor, device: torch.device, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """`values` (CPU) on `device`, or copied into `out` there (a static buffer); to CUDA
    through pinned memory, so the copy is asynchronous and the host can draw the next batch
    while the device still runs the last step (torch's caching host allocator keeps a pinned
    block until its copy is done)."""
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    if out is None:
        return values.to(device, non_blocking=True)
    return out.copy_(values, non_blocking=True)


class BatchSampler:
    """Anchors + partners (see the module docstring) over the N fit items, on `device`."""

    def __init__(self, x: torch.Tensor, content: torch.Tensor, pairs: PairIndex, batch_size: int,
                 generator: torch.Generator, neighbours: int = 8, need_positive: bool = True,
                 near_duplicate: float | None = None, conflicts: ConflictRule | None = None,
                 sparse: bool | None = None):
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"BatchSampler: need at least 2 items to train on, got {n}")
        if batch_size < 4 or batch_size % 4:
            raise ValueError(f"BatchSampler: batch_size must be a multiple of 4, got {batch_size}")
        self.x, self.unit = x, F.normalize(content.float(), dim=1)
        self.pairs, self.generator = pairs, generator
        self.n, self.anchors = n, batch_size // 4
        self.need_positive = need_positive
        # which pair path the batches feed (`SIDModel.sparse_pairs`; None: sparse on the CPU):
        # the sparse one reads the pair lists, the dense one the B x B mask only
        self.sparse = x.device.type == "cpu" if sparse is None else sparse
        # near-duplicates (content cosine > `near_duplicate`, CVPM's τ_dup) depend on the
        # content only: found once here, then looked up per batch like the positives
        self.knn, near = content_neighbours(self.unit, neighbours, above=near_duplicate)
        self.near = PairIndex(near.numpy(), n) if near is not None else None
        # conflict mining: the neighbours' content cosines (for the duplicate rule) and, after
        # each set_codes, which of them the repulsion acts on; nothing to keep without a rule
        self.knn_cos: torch.Tensor | None = None
        if conflicts is not None:
            knn = self.knn.to(self.unit.device)
            self.knn_cos = (self.unit[:, None, :] * self.unit[knn]).sum(dim=2).cpu()
        self.rule = conflicts
        self.conflict: torch.Tensor | None = None  # (N, k) bool, with a rule, after set_codes
        self.sid_partner: torch.Tensor | None = None
        self._order = torch.arange(n)

    @property
    def steps_per_epoch(self) -> int:
        """Steps that take every item as an anchor once."""
        return math.ceil(self.n / self.anchors)

    def new_epoch(self) -> None:
        """Draw this epoch's anchor order."""
        perm = torch.randperm(self.n, generator=self.generator)
        size = self.steps_per_epoch * self.anchors
        self._order = perm.repeat(math.ceil(size / self.n))[:size]

    def set_codes(self, codes: torch.Tensor) -> None:
        """Refresh the SID partners (and, with a rule, the conflicts) from all N items' codes."""
        self.sid_partner = lexicographic_partner(codes, self.generator)
        if self.rule is not None:
            self.conflict = conflict_neighbours(codes.cpu(), self.knn, self.knn_cos,
                                                self.pairs, self.rule)

    def draw(self, step: int) -> torch.Tensor:
        """The draws of batch `step` within the current epoch, on the CPU: (B + A,) int64, the
        B rows in [anchors, collab, knn, sid] blocks, then A 0/1 flags (1 where the anchor's
        collab partner is a collaborative positive). All of a batch's randomness is here."""
        a = self.anchors
        anchors = self._order[step * a:(step + 1) * a]
        pick = torch.randint(self.knn.shape[1], (2, a), generator=self.generator)
        if self.conflict is not None:
            live = self.conflict[anchors]
            weight = torch.where(live.any(dim=1, keepdim=True), live, torch.ones_like(live))
            mined = torch.multinomial(weight.float(), 1, generator=self.generator)[:, 0]
            near = self.knn[anchors, mined]
        else:
            near = self.knn[anchors, pick[0]]
        collab = self.pairs.draw_partner(anchors, self.generator)
        has_pos = collab >= 0
        collab = torch.where(has_pos, collab, self.knn[anchors, pick[1]])
        sid = self.sid_partner[anchors] if self.sid_partner is not None else near
        return torch.cat([anchors, collab, near, sid, has_pos.long()])

    def assemble(self, drawn: torch.Tensor) -> Batch:
        """The dense-path batch of `drawn` (a `draw`, already where the content lives): the
        content gathered and P built there, by device operations alone (no host work, no
        data-dependent shapes), so a CUDA graph can hold them (`fit.GraphedStep`)."""
        return self._assemble(drawn, dense=self.need_positive)

    def batch(self, step: int) -> Batch:
        """The batch of `step` within the current epoch: `draw`, then `to_batch`."""
        return self.to_batch(self.draw(step))

    def to_batch(self, drawn: torch.Tensor) -> Batch:
        """The batch of a CPU `draw` on the sampler's device: one copy to the device, then
        `assemble`, or, where the pair lists are read, the lists instead of the dense P."""
        device = self.x.device
        moved = to_device(drawn, device)
        # pair lists from the CPU rows for the sparse path (the near-duplicates are CVPM's
        # there), and on the CPU for the dense one too: the mask is built from them there
        if not (self.sparse or device.type == "cpu"):
            # the dense P built on the device from the rows: the partner-list walk cost
            # ~1.5 ms a step on the GPU's host
            return self.assemble(moved)
        batch = self._assemble(moved, dense=False)
        rows = drawn[:batch.rows.numel()]
        if self.need_positive:
            batch.positive_pairs = self.pairs.batch_pairs(rows).to(device)
        if self.near is not None:
            batch.near_pairs = self.near.batch_pairs(rows).to(device)
        return batch

    def _assemble(self, drawn: torch.Tensor, dense: bool) -> Batch:
        a = self.anchors
        rows, pair_weight = drawn[:4 * a], drawn[4 * a:].float()
        index = torch.arange(a, device=drawn.device)
        return Batch(
            rows=rows,
            x=self.x[rows],
            unit=self.unit[rows],
            positive=self.pairs.dense_mask(rows) if dense else None,
            anchor=index,
            target=index + a,
            pair_weight=pair_weight,
        )

    def state(self) -> dict:
        """What a checkpoint needs to resume the same batch stream (with the generator state)."""
        return {"sid_partner": self.sid_partner, "conflict": self.conflict}

    def load_state(self, state: dict) -> None:
        """Restore `state()`."""
        self.sid_partner = state.get("sid_partner")
        self.conflict = state.get("conflict")

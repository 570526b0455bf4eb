"""Training diagnostics: what a tokenizer fit does to chosen groups of item pairs.

Built to answer why a tokenizer separates (or fails to separate) the synthetic world's
harmful look-alike pairs while keeping its benign near-duplicates together. A `PairProbe`
watches named groups of pairs (rows into the fit items) and, without touching the training
(no gradient, no draw from the training generator, no codebook usage counted), records per
epoch:

- in the batches, for every in-batch occurrence (positions i, j) of a group pair: how it came
  there (the sampler's planted partner blocks of its anchor, or chance), its Hamming distance
  under the step's codes, the CVPM reason that drops it (`PROBE_REASONS`, first match wins as
  in `losses.cvpm_mask`, computed whether or not the tokenizer uses CVPM), whether the
  tokenizer's repulsion (HaMR's CVPM mask or uniform's H ≤ h_u mask) acts on it, and the
  push it gets: |∂(λ·loss)/∂d_ij| = 4·λ·w_ij·max(0, m_ij − d_ij)/B, the force on its latent
  distance (the loss sums both orders of the pair; HaMR: w = s^γ, m = m₀(1 + s); uniform:
  w = 1, m = m_u);
- the share of group pairs that met in at least one batch of the epoch, and meetings per pair;
- with `forces_every` = k > 0, at every k-th step, which loss term moves the groups apart or
  together (`forces`): for each term T (weighted as in the total loss) its first-order
  change of the groups' mean latent distance in an AdamW step, Δd_T = −lr · ∇θ d̄ ·
  (∇θ λ_T T / (√v̂ + ε)) · c, with d̄ the mean unit-latent distance over ALL the group's pairs
  (every step moves every item: the weights are shared), v̂ Adam's bias-corrected second
  moment, c the step's clipping factor; plus AdamW's weight decay, −lr · wd · ∇θ d̄ · θ.
  Summed over the epoch's steps (scaled up from the sampled ones): positive = apart. It
  leaves out Adam's momentum (it spreads each gradient over later steps, same total);
- after the epoch, on the codes of all fit items: the Hamming histogram of the group pairs
  (the harmful / benign rate on fit items is the share with H ≤ 1), how many pairs crossed
  that line since the previous epoch (`escaped`: H ≤ 1 -> H ≥ 2, `returned`: back), and
  their mean unit-latent distance d beside that of fixed random item pairs (how close the
  encoder keeps them).
"""

from __future__ import annotations

import numpy as np
import torch

from quasid.tokenizer.batches import Batch
from quasid.tokenizer.losses import CVPM_REASONS
from quasid.tokenizer.pairs import PairIndex

TERM_WEIGHTS = {"rec": None, "rq": None, "hamr": "hamr_weight",
                "contrastive": "contrastive_weight", "adasid": "adasid_weight",
                "uniform": "uniform_weight"}
"""Loss term -> the config field weighting it in the total (None: weight 1)."""

PROBE_REASONS = (*CVPM_REASONS, "valid")
"""CVPM's exclusion reasons in attribution order, then `valid` (kept by the mask)."""

PLANTED_BLOCKS = ("collab", "knn", "sid")
"""The sampler's partner blocks 1-3 (`batches.BatchSampler`): an anchor's planted partners."""


def cvpm_reasons(same_row: torch.Tensor, same_item: torch.Tensor, positive: torch.Tensor,
                 content_cos: torch.Tensor, ham: torch.Tensor, tau_dup: float, h_max: int
                 ) -> torch.Tensor:
    """Index into `PROBE_REASONS` of the first reason CVPM drops each pair for (elementwise).

    The inputs (any one shape: B x B matrices or per-pair vectors) are CVPM's conditions:
    the same batch position, the same item, a collaborative positive, the content cosine and
    the Hamming distance. Same reasons, order and thresholds as `losses.cvpm_mask`, whose
    mask is exactly `cvpm_reasons(...) == len(CVPM_REASONS)` (the index of `valid`).
    """
    reasons = torch.stack(torch.broadcast_tensors(
        same_row, same_item, positive, content_cos > tau_dup, ham > h_max))
    first = reasons.to(torch.int8).argmax(dim=0).long()  # argmax returns the first True
    return torch.where(reasons.any(dim=0), first, torch.full_like(first, len(CVPM_REASONS)))


def _occurrences(rows: torch.Tensor, pairs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every in-batch occurrence of the group pairs, without a B x B matrix.

    Returns (k, i, j): occurrence t is pair k[t] with its first item at batch position i[t]
    and its second at j[t]; an item repeated in the batch gives one occurrence per
    combination of positions.
    """
    sorted_rows, order = torch.sort(rows, stable=True)
    first = torch.searchsorted(sorted_rows, pairs, right=False)
    count = torch.searchsorted(sorted_rows, pairs, right=True) - first
    combos = count[:, 0] * count[:, 1]
    k = torch.repeat_interleave(torch.arange(len(pairs), device=rows.device), combos)
    offset = torch.arange(len(k), device=rows.device) - (torch.cumsum(combos, 0) - combos)[k]
    i = order[first[k, 0] + offset // count[k, 1]]
    j = order[first[k, 1] + offset % count[k, 1]]
    return k, i, j


class PairProbe:
    """Per-epoch statistics of named pair groups during `fit_model` (see the module docstring).

    groups: name -> (m, 2) rows into the fit items; positives: (p, 2) rows of the
    collaborative positives the fit uses (CVPM's P, also for tokenizers that do not read it);
    n: number of fit items; cfg: the tokenizer config; reference_pairs: random item pairs
    drawn once (seeded by `seed`) whose mean latent distance is the yardstick for the groups'.
    """

    def __init__(self, groups: dict[str, np.ndarray], positives: np.ndarray, n: int, cfg,
                 device: str | torch.device = "cpu", reference_pairs: int = 4096, seed: int = 0,
                 forces_every: int = 0):
        if not groups:
            raise ValueError("PairProbe: no pair groups to watch")
        self.cfg, self.n, self.device = cfg, n, torch.device(device)
        self.forces_every = forces_every
        self.groups: dict[str, torch.Tensor] = {}
        for name, rows in groups.items():
            rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"PairProbe: group {name!r} has rows outside [0, {n})")
            self.groups[name] = torch.from_numpy(rows).to(self.device)
        self.positives = PairIndex(positives, n, self.device)
        rng = np.random.default_rng(seed)
        ref = rng.integers(0, n, size=(reference_pairs, 2))
        self.reference = torch.from_numpy(ref[ref[:, 0] != ref[:, 1]]).to(self.device)
        self.static = {name: {"pairs": len(rows),
                              "collaborative_share": self._share_positive(rows)}
                       for name, rows in self.groups.items()}
        self._last_h: dict[str, torch.Tensor] = {}
        self._reset()

    def _share_positive(self, rows: torch.Tensor) -> float:
        if len(rows) == 0:
            return 0.0
        return float(self.positives.contains(rows[:, 0], rows[:, 1]).float().mean())

    def _reset(self) -> None:
        levels = self.cfg.levels
        self._acc = {name: {
            "occurrences": torch.zeros((), dtype=torch.int64),
            "reasons": torch.zeros(len(PROBE_REASONS), dtype=torch.int64),
            "step_hamming": torch.zeros(levels + 1, dtype=torch.int64),
            "pushed": torch.zeros((), dtype=torch.int64),
            "push": torch.zeros((), dtype=torch.float64),
            "planted": torch.zeros(len(PLANTED_BLOCKS), dtype=torch.int64),
            "contrastive_positive": torch.zeros((), dtype=torch.int64),
            "meetings": torch.zeros(len(rows), dtype=torch.int64),
            "forces": {},
        } for name, rows in self.groups.items()}
        self._steps = 0
        self._force_steps = 0

    def _push(self, d: torch.Tensor, ham: torch.Tensor, valid: torch.Tensor,
              cos: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(|∂(λ·loss)/∂d| per occurrence, whether the repulsion acts on it).

        The losses sum ordered pairs, so an unordered pair enters twice:
        ∂/∂d = 2 · λ · w · 2 · max(0, m − d) / B.
        """
        cfg = self.cfg
        force = torch.zeros_like(d, dtype=torch.float64)
        acted = torch.zeros_like(valid)
        if cfg.hamr:
            s = 1.0 - ham.float() / cfg.levels
            w = torch.where(valid, s.pow(cfg.hamr_gamma), torch.zeros_like(s))
            hinge = (cfg.hamr_margin * (1.0 + s) - d).clamp_min(0.0)
            force += (4.0 * cfg.hamr_weight * w * hinge / batch_size).double()
            acted |= w > 0
        if cfg.uniform:  # the pair's items differ, so U = [H <= h_u] (and its cosine rule)
            mask = ham <= cfg.uniform_h_max
            if cfg.uniform_tau_dup <= 1:
                mask = mask & (cos <= cfg.uniform_tau_dup)
            hinge = (cfg.uniform_margin - d).clamp_min(0.0)
            force += (4.0 * cfg.uniform_weight * mask.float() * hinge / batch_size).double()
            acted |= mask
        return force, acted

    def step(self, model, batch: Batch, optimizer=None, progress: float = 0.0,
             x: torch.Tensor | None = None) -> None:
        """Record the batch about to be trained on (call before the optimizer step).

        The force attribution (`forces_every`) needs the `optimizer` (AdamW, with state), the
        training `progress` and the standardized content `x` of all fit items.
        """
        self._record(model, batch)
        if (self.forces_every and optimizer is not None and x is not None
                and (self._steps - 1) % self.forces_every == 0):
            self._forces(model, batch, optimizer, progress, x)

    def _forces(self, model, batch: Batch, optimizer, progress: float, x: torch.Tensor) -> None:
        """Add this step's first-order Δ(mean group distance) per loss term (module docstring)."""
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad]
        state = [optimizer.state.get(p, {}) for p in params]
        if not params or any("exp_avg_sq" not in st for st in state):
            return  # before the first step Adam has no second moment yet
        opt = optimizer.param_groups[0]
        # float(): a tensor lr with CUDA graphs
        lr, wd, eps = float(opt["lr"]), opt["weight_decay"], opt["eps"]
        beta2 = opt["betas"][1]
        denom = []
        for st in state:
            steps = float(st["step"])
            denom.append((st["exp_avg_sq"] / (1.0 - beta2 ** steps)).sqrt() + eps)
        quantizer_mode = model.quantizer.training
        model.quantizer.train(False)  # no usage counting or EMA update from this forward
        try:
            with torch.enable_grad():
                _, terms = model.losses(batch, progress, keep_graph=True)
                weighted = {k: v * (1.0 if TERM_WEIGHTS[k] is None
                                    else getattr(self.cfg, TERM_WEIGHTS[k]))
                            for k, v in terms.items() if k in TERM_WEIGHTS}
                grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                         for k, v in weighted.items()}
                distance_grads = {}
                for name, pairs in self.groups.items():
                    if len(pairs) == 0:
                        continue
                    rows, inverse = torch.unique(pairs, return_inverse=True)
                    unit = torch.nn.functional.normalize(model.encoder(x[rows]).float(), dim=1)
                    diff = unit[inverse[:, 0]] - unit[inverse[:, 1]]
                    mean_d = torch.sqrt(diff.pow(2).sum(dim=1) + 1e-8).mean()
                    distance_grads[name] = torch.autograd.grad(mean_d, params, allow_unused=True)
        finally:
            model.quantizer.train(quantizer_mode)

        def zero_if_none(g, p):
            return torch.zeros_like(p) if g is None else g

        total = [sum(zero_if_none(g[i], p) for g in grads.values()) for i, p in enumerate(params)]
        norm = torch.sqrt(sum(t.pow(2).sum() for t in total))
        clip = self.cfg.train.grad_clip
        scale = float(min(1.0, clip / (float(norm) + 1e-6))) if clip > 0 else 1.0
        for name, gd in distance_grads.items():
            gd = [zero_if_none(g, p) for g, p in zip(gd, params)]
            forces = self._acc[name]["forces"]
            for term, g in grads.items():
                step = sum((a * zero_if_none(b, p) / c).sum()
                           for a, b, p, c in zip(gd, g, params, denom))
                forces[term] = forces.get(term, 0.0) - lr * scale * float(step)
            decay = sum((a * p.detach()).sum() for a, p in zip(gd, params))
            forces["weight_decay"] = forces.get("weight_decay", 0.0) - lr * wd * float(decay)
        self._force_steps += 1

    @torch.no_grad()
    def _record(self, model, batch: Batch) -> None:
        cfg = self.cfg
        rows = batch.rows
        b, a = rows.shape[0], batch.anchor.shape[0]
        z = model.encoder(batch.x).float()
        codes = model.quantizer.codes(z)  # the codes the step's forward pass assigns
        unit_z = torch.nn.functional.normalize(z, dim=1)
        for name, pairs in self.groups.items():
            acc = self._acc[name]
            k, i, j = _occurrences(rows, pairs)
            ham = (codes[i] != codes[j]).sum(dim=1)
            cos = (batch.unit[i] * batch.unit[j]).sum(dim=1)
            positive = self.positives.contains(rows[i], rows[j])
            reason = cvpm_reasons(i == j, rows[i] == rows[j], positive, cos, ham,
                                  cfg.tau_dup, cfg.max_hamming)
            d = torch.sqrt((2.0 - 2.0 * (unit_z[i] * unit_z[j]).sum(dim=1)).clamp_min(0.0)
                           + 1e-8)  # as losses.unit_distances
            force, acted = self._push(d, ham, reason == len(CVPM_REASONS), cos, b)
            lo, hi = torch.minimum(i, j), torch.maximum(i, j)
            acc["occurrences"] += len(k)
            acc["reasons"] += torch.bincount(reason, minlength=len(PROBE_REASONS)).cpu()
            acc["step_hamming"] += torch.bincount(ham, minlength=cfg.levels + 1).cpu()
            acc["pushed"] += int(acted.sum())
            acc["push"] += float(force.sum())
            for block in range(len(PLANTED_BLOCKS)):  # hi is lo's partner in block + 1
                acc["planted"][block] += int(((lo < a) & (hi == lo + (block + 1) * a)).sum())
            collab = (lo < a) & (hi == lo + a)
            acc["contrastive_positive"] += int((collab & (batch.pair_weight[lo.clamp_max(a - 1)]
                                                          > 0)).sum())
            acc["meetings"] += torch.bincount(k, minlength=len(pairs)).clamp_max(1).cpu()
        self._steps += 1

    @torch.no_grad()
    def epoch(self, model, x: torch.Tensor, codes: torch.Tensor) -> dict:
        """The epoch's record (JSON-ready) from the step counters, the standardized content
        `x` and the codes of all fit items after the epoch; resets the counters."""
        levels = self.cfg.levels
        z = model.encoder(x).float()
        unit = torch.nn.functional.normalize(z, dim=1)

        def mean_distance(pairs: torch.Tensor) -> float:
            if len(pairs) == 0:
                return float("nan")
            diff = unit[pairs[:, 0]] - unit[pairs[:, 1]]
            return float(diff.norm(dim=1).mean())

        out: dict = {"steps": self._steps, "reference_distance": mean_distance(self.reference)}
        for name, pairs in self.groups.items():
            acc = self._acc[name]
            occ = int(acc["occurrences"])
            h = (codes[pairs[:, 0]] != codes[pairs[:, 1]]).sum(dim=1)
            hist = torch.bincount(h, minlength=levels + 1).tolist()
            meetings = acc["meetings"].double()
            last = self._last_h.get(name)
            self._last_h[name] = h
            out[name] = {
                **self.static[name],
                "hamming_hist": hist,
                "rate_h_le_1": float((h <= 1).double().mean()) if len(pairs) else 0.0,
                "escaped": int(((last <= 1) & (h >= 2)).sum()) if last is not None else 0,
                "returned": int(((last >= 2) & (h <= 1)).sum()) if last is not None else 0,
                "mean_distance": mean_distance(pairs),
                "occurrences": occ,
                "reasons": dict(zip(PROBE_REASONS, acc["reasons"].tolist())),
                "step_hamming_hist": acc["step_hamming"].tolist(),
                "pushed_share": int(acc["pushed"]) / occ if occ else 0.0,
                "mean_push": float(acc["push"]) / occ if occ else 0.0,
                "planted": dict(zip(PLANTED_BLOCKS, acc["planted"].tolist())),
                "contrastive_positive": int(acc["contrastive_positive"]),
                "met_share": float((meetings > 0).double().mean()) if len(pairs) else 0.0,
                # per epoch: scaled from the sampled steps to all of the epoch's steps
                "forces": {k: v * self._steps / self._force_steps
                           for k, v in acc["forces"].items()} if self._force_steps else {},
                "meetings_per_pair": float(meetings.mean()) if len(pairs) else 0.0,
            }
        self._reset()
        return out


def world_pair_rows(pairs: np.ndarray, fit_ids: np.ndarray) -> np.ndarray:
    """(m, 2) rows into `fit_ids` of the item-id `pairs` whose two items are both fit items.

    Pairs with a cold member are left out: the fit never sees that item, so nothing in the
    batches can act on the pair (the SID metrics still count it, encoded from content).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    fit_ids = np.asarray(fit_ids, dtype=np.int64)
    size = int(max(pairs.max(initial=-1), fit_ids.max(initial=-1))) + 1
    row_of = np.full(size, -1, dtype=np.int64)
    row_of[fit_ids] = np.arange(len(fit_ids))
    rows = row_of[pairs]
    return rows[(rows >= 0).all(axis=1)]

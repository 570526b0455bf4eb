"""The model behind every neural tokenizer: standardization, encoder, residual quantizer,
decoder and contrastive towers, and the total loss of one batch:

L = L_rec + L_rq + λ_h HaMR + λ_c InfoNCE + λ_a AdaSID + λ_u Uniform (terms in
`quasid.tokenizer.losses`; each switched on by its `TokenizerConfig` flag).
"""

from __future__ import annotations

import torch
from torch import nn

from quasid.tokenizer import losses as L
from quasid.tokenizer import pair_terms as P
from quasid.tokenizer.batches import Batch
from quasid.tokenizer.config import TokenizerConfig
from quasid.tokenizer.encoder import Decoder, Encoder, mlp
from quasid.tokenizer.quantizer import ResidualQuantizer


class SIDModel(nn.Module):
    """Standardization, encoder, residual quantizer, decoder and contrastive towers.

    Content is standardized as x' = (x − μ) / σ with σ² = mean ‖x − μ‖² over the fit items,
    so the reconstruction loss reads as a share of variance. `rqkmeans` has no encoder (the
    quantizer works on x' itself).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.content_dim < 1:
            raise ValueError(f"SIDModel: content_dim must be set (>= 1), got {cfg.content_dim}")
        self.cfg = cfg
        dim = cfg.content_dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        latent = cfg.latent if cfg.neural else dim
        neural = cfg.neural
        self.encoder: nn.Module = Encoder(dim, cfg.hidden, cfg.latent) if neural else nn.Identity()
        self.decoder: nn.Module | None = Decoder(dim, cfg.hidden, cfg.latent) if neural else None
        self.quantizer = ResidualQuantizer(cfg.levels, cfg.codebook_size, latent, cfg.beta,
                                           ema=cfg.ema, decay=cfg.ema_decay)
        self.tower_f = mlp([latent, cfg.tower_dim, cfg.tower_dim]) if cfg.contrastive else None
        self.tower_g = mlp([latent, cfg.tower_dim, cfg.tower_dim]) if cfg.contrastive else None
        self.sparse_pairs: bool | None = None  # pair-term path; None: sparse on the CPU only

    @torch.no_grad()
    def set_standardization(self, content: torch.Tensor) -> None:
        """Set μ and σ from the fit items' raw content."""
        content = content.float()
        self.mean.copy_(content.mean(dim=0))
        self.scale.copy_((content - self.mean).pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-8))

    def standardize(self, content: torch.Tensor) -> torch.Tensor:
        """x' = (x − μ) / σ."""
        return (content.float() - self.mean) / self.scale

    @torch.no_grad()
    def codes(self, content: torch.Tensor) -> torch.Tensor:
        """(n, L) int64 codes of raw content rows (fp32, no usage counting)."""
        return self.quantizer.codes(self.encoder(self.standardize(content)).float())

    def losses(self, batch: Batch, progress: float, keep_graph: bool = False
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {term: detached value, plus pair statistics}) of one batch.

        `progress` ∈ [0, 1] is the share of training done (AdaSID's schedule). The pair terms
        run on the batch's sparse pair sets on the CPU (`quasid.tokenizer.pair_terms`) and as
        dense B × B formulas elsewhere (static shapes for CUDA graphs and `torch.compile`);
        `self.sparse_pairs` (None = by device) overrides the choice. Same values either way,
        up to float summation order.
        With `keep_graph` the terms keep their graph (the diagnostics take each term's
        gradient).
        """
        cfg = self.cfg
        z = self.encoder(batch.x)
        q = self.quantizer(z)
        x_hat = self.decoder(q.quantized)
        terms = {"rec": L.reconstruction_loss(x_hat, batch.x), "rq": q.loss}
        sparse = self.sparse_pairs if self.sparse_pairs is not None \
            else batch.x.device.type == "cpu"
        pair_terms = self._sparse_pair_terms if sparse else self._dense_pair_terms
        stats = pair_terms(batch, z, q.codes, progress, terms)
        total = terms["rec"] + terms["rq"]
        for name, weight in (("hamr", cfg.hamr_weight), ("uniform", cfg.uniform_weight),
                             ("adasid", cfg.adasid_weight)):
            if name in terms:
                total = total + weight * terms[name]
        if cfg.contrastive:
            f = self.tower_f(q.quantized)
            g = self.tower_g(q.quantized)
            if sparse:
                allowed = P.contrastive_allowed(batch.rows, batch.anchor, batch.positive_pairs)
            else:
                anchor_rows = batch.rows[batch.anchor]
                allowed = (anchor_rows[:, None] != batch.rows[None, :]) \
                    & ~batch.positive_mask()[batch.anchor]
            terms["contrastive"] = L.info_nce(f, g, batch.anchor, batch.target, allowed,
                                              batch.pair_weight, cfg.tau)
            total = total + cfg.contrastive_weight * terms["contrastive"]
            stats["contrastive_pairs"] = batch.pair_weight.sum()
        if not keep_graph:
            terms = {k: v.detach() for k, v in terms.items()}
        terms["total"] = total.detach()
        return total, {**terms, **stats}

    def _dense_pair_terms(self, batch: Batch, z: torch.Tensor, codes: torch.Tensor,
                          progress: float, terms: dict) -> dict[str, torch.Tensor]:
        """HaMR, uniform and AdaSID as B × B formulas (`losses`) into `terms`; the stats."""
        cfg = self.cfg
        rows = batch.rows
        stats: dict[str, torch.Tensor] = {}
        if cfg.hamr or cfg.uniform:
            ham = L.hamming(codes)
        if cfg.hamr or cfg.adasid or (cfg.uniform and cfg.uniform_tau_dup <= 1):
            cos = batch.unit @ batch.unit.T
            positive = batch.positive_mask()
        if cfg.hamr:
            cv = L.cvpm_mask(rows, ham, cos, positive, cfg.tau_dup, cfg.max_hamming)
            terms["hamr"] = L.hamr_loss(z, ham, cfg.levels, cv.mask, cfg.hamr_margin,
                                        cfg.hamr_gamma)
            stats["cvpm_excluded"] = cv.excluded
            stats["valid_pairs"] = cv.mask.sum()
        if cfg.uniform or cfg.adasid:
            distinct = rows[:, None] != rows[None, :]
        if cfg.uniform:
            mask = distinct & (ham <= cfg.uniform_h_max)
            if cfg.uniform_tau_dup <= 1:  # the ablation that keeps near-duplicates, as CVPM
                mask = mask & (cos <= cfg.uniform_tau_dup)
            terms["uniform"] = L.uniform_repulsion_loss(z, mask, cfg.uniform_margin)
            stats["uniform_pairs"] = mask.sum()
        if cfg.adasid:
            weights = L.adasid_weights(codes, cos, positive, distinct)
            rho = L.adasid_schedule(progress, cfg.rho_end)
            terms["adasid"] = L.adasid_loss(z, weights, rho, cfg.adasid_margin)
        return stats

    def _sparse_pair_terms(self, batch: Batch, z: torch.Tensor, codes: torch.Tensor,
                           progress: float, terms: dict) -> dict[str, torch.Tensor]:
        """HaMR, uniform and AdaSID on the sparse pair sets (`pair_terms`) into `terms`; the
        stats (ordered-pair counts, as the dense ones)."""
        cfg = self.cfg
        rows = batch.rows
        stats: dict[str, torch.Tensor] = {}
        if not (cfg.hamr or cfg.uniform or cfg.adasid):
            return stats
        unit = P.unit_latent(z)
        if cfg.hamr or cfg.uniform:
            # one pair set and one Hamming computation for both terms
            reach = max(cfg.max_hamming if cfg.hamr else -1,
                        cfg.uniform_h_max if cfg.uniform else -1)
            close = P.close_pairs(codes, reach)
            ham = P.pair_hamming(codes, close)
        if cfg.hamr:
            cv = P.cvpm_pairs(rows, codes, close, ham, batch.unit, batch.positive_pairs,
                              cfg.tau_dup, cfg.max_hamming, batch.near_pairs)
            terms["hamr"] = P.hamr_loss(unit, cv, cfg.levels, cfg.hamr_margin, cfg.hamr_gamma)
            stats["cvpm_excluded"] = cv.excluded
            stats["valid_pairs"] = torch.tensor(2 * cv.pairs.shape[0])
        if cfg.uniform:
            pick = (ham <= cfg.uniform_h_max) & (rows[close[:, 0]] != rows[close[:, 1]])
            if cfg.uniform_tau_dup <= 1:  # the ablation that keeps near-duplicates, as CVPM
                cos = (batch.unit[close[:, 0]] * batch.unit[close[:, 1]]).sum(-1)
                pick = pick & (cos <= cfg.uniform_tau_dup)
            terms["uniform"] = P.uniform_loss(unit, close[pick], cfg.uniform_margin)
            stats["uniform_pairs"] = 2 * pick.sum()
        if cfg.adasid:
            pairs, weights = P.adasid_pairs(rows, codes, batch.unit, batch.positive_pairs)
            rho = L.adasid_schedule(progress, cfg.rho_end)
            terms["adasid"] = P.adasid_loss(unit, pairs, weights, rho, cfg.adasid_margin)
        return stats

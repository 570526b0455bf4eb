"""The model behind every neural tokenizer: standardization, encoder, residual quantizer,
decoder and contrastive towers, and the total loss of one batch:

L = L_rec + L_rq + λ_h HaMR + λ_c InfoNCE + λ_a AdaSID + λ_u Uniform (terms in
`quasid.tokenizer.losses`; each switched on by its `TokenizerConfig` flag).
"""

from __future__ import annotations

import torch
from torch import nn

from quasid.tokenizer import losses as L
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

        `progress` ∈ [0, 1] is the share of training done (AdaSID's schedule). With
        `keep_graph` the terms keep their graph (the diagnostics take each term's gradient).
        """
        cfg = self.cfg
        z = self.encoder(batch.x)
        q = self.quantizer(z)
        x_hat = self.decoder(q.quantized)
        terms = {"rec": L.reconstruction_loss(x_hat, batch.x), "rq": q.loss}
        stats: dict[str, torch.Tensor] = {}
        total = terms["rec"] + terms["rq"]
        rows = batch.rows
        if cfg.hamr or cfg.uniform:
            ham = L.hamming(q.codes)
        if cfg.hamr or cfg.adasid or (cfg.uniform and cfg.uniform_tau_dup <= 1):
            cos = batch.unit @ batch.unit.T
        if cfg.hamr:
            cv = L.cvpm_mask(rows, ham, cos, batch.positive, cfg.tau_dup, cfg.max_hamming)
            terms["hamr"] = L.hamr_loss(z, ham, cfg.levels, cv.mask, cfg.hamr_margin,
                                        cfg.hamr_gamma)
            total = total + cfg.hamr_weight * terms["hamr"]
            stats["cvpm_excluded"] = cv.excluded
            stats["valid_pairs"] = cv.mask.sum()
        if cfg.uniform or cfg.adasid:
            distinct = rows[:, None] != rows[None, :]
        if cfg.uniform:
            mask = distinct & (ham <= cfg.uniform_h_max)
            if cfg.uniform_tau_dup <= 1:
                mask = mask & (cos <= cfg.uniform_tau_dup)
            terms["uniform"] = L.uniform_repulsion_loss(z, mask, cfg.uniform_margin)
            total = total + cfg.uniform_weight * terms["uniform"]
            stats["uniform_pairs"] = mask.sum()
        if cfg.adasid:
            weights = L.adasid_weights(q.codes, cos, batch.positive, distinct)
            rho = L.adasid_schedule(progress, cfg.rho_end)
            terms["adasid"] = L.adasid_loss(z, weights, rho, cfg.adasid_margin)
            total = total + cfg.adasid_weight * terms["adasid"]
        if cfg.contrastive:
            f = self.tower_f(q.quantized)
            g = self.tower_g(q.quantized)
            anchor_rows = rows[batch.anchor]
            allowed = (anchor_rows[:, None] != rows[None, :]) & ~batch.positive[batch.anchor]
            terms["contrastive"] = L.info_nce(f, g, batch.anchor, batch.target, allowed,
                                              batch.pair_weight, cfg.tau)
            total = total + cfg.contrastive_weight * terms["contrastive"]
            stats["contrastive_pairs"] = batch.pair_weight.sum()
        if not keep_graph:
            terms = {k: v.detach() for k, v in terms.items()}
        terms["total"] = total.detach()
        return total, {**terms, **stats}

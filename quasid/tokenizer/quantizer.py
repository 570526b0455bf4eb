"""Residual vector quantization: L levels of K codes, k-means initialized, dead codes re-seeded.

Level l quantizes the residual left by the levels before it: r_0 = z, c_l = argmin_k
‖r_l − e_lk‖², r_{l+1} = r_l − sg(e_{l,c_l}); the quantized latent is Σ_l e_{l,c_l}, passed
on with straight-through gradients. Codebooks learn by gradient (the codebook term of
`losses.rq_loss`) or, with `ema=True`, by exponential moving averages of their assigned
residuals. All randomness comes from a `torch.Generator` on the CPU, so the same seed draws
the same numbers on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quasid.tokenizer.losses import rq_loss


def draw(generator: torch.Generator, n: int, high: int, device: torch.device) -> torch.Tensor:
    """`n` uniform integers in [0, high) from the CPU generator, moved to `device`."""
    return torch.randint(high, (n,), generator=generator).to(device)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean) for each row of x, in float32."""
    x = x.float()
    c = centroids.float()
    dist = (c * c).sum(dim=1)[None, :] - 2.0 * x @ c.T
    return dist.argmin(dim=1)


def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """((k, d) sums of the rows of x per cluster, (k,) cluster sizes); each sum is taken in
    row order on every device (the sizes' bincount syncs with the host on CUDA).

    Not `index_add_`: on CUDA it adds with atomics, so float sums (and every k-means
    centroid after them) changed from run to run of the same seed.
    """
    order = torch.argsort(assign, stable=True)
    sizes = torch.bincount(assign, minlength=k)
    return torch.segment_reduce(x[order], "sum", lengths=sizes, axis=0), sizes


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ∝ squared distance."""
    n = x.shape[0]
    centroids = x.new_empty((k, x.shape[1]))
    centroids[0] = x[draw(generator, 1, n, x.device)[0]]
    best = (x - centroids[0]).pow(2).sum(dim=1)
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    for j in range(1, k):
        cum = best.double().cumsum(0)
        # all points on the chosen centroids: fall back to uniform choice
        total = torch.where(cum[-1] > 0, cum[-1], torch.ones_like(cum[-1]))
        cum = torch.where(cum[-1] > 0, cum, torch.arange(1, n + 1, device=x.device).double() / n)
        idx = torch.searchsorted(cum, (uniforms[j] * total).reshape(1)).clamp_max(n - 1)
        centroids[j] = x[idx[0]]
        best = torch.minimum(best, (x - centroids[j]).pow(2).sum(dim=1))
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None,
           max_points: int = 65_536) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on (at most `max_points` sampled) rows of x.

    Returns (k, d) centroids. With fewer distinct points than k, the surplus centroids are
    copies of data points plus small noise (they start dead and get re-seeded in training).
    An empty cluster keeps its previous centroid.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = x.detach().float()
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_points].to(x.device)]
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans: no points to cluster")
    if n < k:
        extra = x[draw(generator, k - n, n, x.device)]
        noise = torch.randn(extra.shape, generator=generator).to(x.device)
        return torch.cat([x, extra + 1e-3 * x.std().clamp_min(1e-6) * noise])
    centroids = _kmeans_pp(x, k, generator)
    for _ in range(iters):
        assign = nearest(x, centroids)
        sums, sizes = cluster_sums(x, assign, k)
        count = sizes.to(x.dtype)
        centroids = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], centroids)
    return centroids


@dataclass
class QuantizerOutput:
    """One forward pass: straight-through latent, codes, rq loss, per-level residuals/codewords."""

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    residuals: list[torch.Tensor]
    codewords: list[torch.Tensor]


class ResidualQuantizer(nn.Module):
    """L levels × K codes over a `dim`-dimensional latent (see the module docstring)."""

    def __init__(self, levels: int = 3, codebook_size: int = 256, dim: int = 32,
                 beta: float = 0.25, ema: bool = False, decay: float = 0.99):
        super().__init__()
        if levels < 1 or codebook_size < 2:
            raise ValueError(f"ResidualQuantizer: need levels >= 1 and codebook_size >= 2, got "
                             f"levels={levels}, codebook_size={codebook_size}")
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.beta, self.ema, self.decay = beta, ema, decay
        self.codebooks = nn.Parameter(0.01 * torch.randn(levels, codebook_size, dim),
                                      requires_grad=not ema)
        self.register_buffer("usage", torch.zeros(levels, codebook_size))
        self.register_buffer("ema_count", torch.ones(levels, codebook_size))
        self.register_buffer("ema_sum", self.codebooks.detach().clone())
        self._last_residuals: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize z level by level; in training, count code usage (and update EMA codebooks)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            r = z
            codes, residuals, codewords = [], [], []
            for level in range(self.levels):
                book = self.codebooks[level]
                idx = nearest(r.detach(), book)
                # not book[idx]: its backward (accumulating index_put_) sums repeated codes
                # in a thread-dependent order on the CPU; embedding's backward sums them in a
                # fixed order on the CPU and on CUDA
                e = F.embedding(idx, book)
                codes.append(idx)
                residuals.append(r)
                codewords.append(e)
                r = r - e.detach()
            quantized = torch.stack(codewords).sum(dim=0)
            loss = rq_loss(residuals, codewords, self.beta, codebook_term=not self.ema)
            codes_t = torch.stack(codes, dim=1)
            if self.training:
                self._track(codes_t, residuals)
            out = z + (quantized - z).detach()
        return QuantizerOutput(out, codes_t, loss, residuals, codewords)

    @torch.no_grad()
    def _track(self, codes: torch.Tensor, residuals: list[torch.Tensor]) -> None:
        self._last_residuals = [r.detach() for r in residuals]
        ones = torch.ones(codes.shape[0], device=codes.device)
        for level in range(self.levels):
            # index_add_ rather than bincount: bincount syncs with the host on CUDA
            count = torch.zeros(self.codebook_size, device=codes.device).index_add_(
                0, codes[:, level], ones)
            self.usage[level] += count
            if self.ema:
                sums, _ = cluster_sums(residuals[level].detach().float(), codes[:, level],
                                       self.codebook_size)
                self.ema_count[level].mul_(self.decay).add_(count, alpha=1 - self.decay)
                self.ema_sum[level].mul_(self.decay).add_(sums, alpha=1 - self.decay)
                n = self.ema_count[level].sum()
                # Laplace smoothing keeps rarely used codes finite
                smoothed = (self.ema_count[level] + 1e-5) / (n + self.codebook_size * 1e-5) * n
                self.codebooks[level].copy_(self.ema_sum[level] / smoothed[:, None])

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(n, L) int64 codes of z (no gradient, no usage counting)."""
        z = z.float()
        r = z
        out = []
        for level in range(self.levels):
            idx = nearest(r, self.codebooks[level])
            out.append(idx)
            r = r - self.codebooks[level][idx]
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, generator: torch.Generator, iters: int = 20) -> None:
        """Set each level's codebook to k-means centroids of the residuals it will see."""
        r = z.detach().float()
        for level in range(self.levels):
            centroids = kmeans(r, self.codebook_size, iters=iters, generator=generator)
            self.codebooks[level].copy_(centroids)
            self.ema_sum[level].copy_(centroids)
            self.ema_count[level].fill_(1.0)
            r = r - centroids[nearest(r, centroids)]
        self.usage.zero_()

    @torch.no_grad()
    def reseed_dead(self, generator: torch.Generator, min_usage: float = 1.0) -> list[int]:
        """Move codes used fewer than `min_usage` times since the last call onto residuals.

        Each dead code at level l becomes a random residual from the last training batch at
        that level (plus noise of 1% of their spread), where it will win assignments.
        Returns the number of codes re-seeded per level; resets the usage counts.
        """
        reseeded = []
        for level in range(self.levels):
            dead = torch.nonzero(self.usage[level] < min_usage).flatten()
            n_dead = int(dead.numel())
            if n_dead and self._last_residuals:
                pool = self._last_residuals[level]
                pick = pool[draw(generator, n_dead, pool.shape[0], pool.device)]
                noise = torch.randn(pick.shape, generator=generator).to(pool.device)
                new = pick + 0.01 * pool.std().clamp_min(1e-6) * noise
                self.codebooks[level, dead] = new.to(self.codebooks.dtype)
                self.ema_sum[level, dead] = new
                self.ema_count[level, dead] = 1.0
            reseeded.append(n_dead if self._last_residuals else 0)
        self.usage.zero_()
        return reseeded

"""MLP encoder and decoder of the SID tokenizers (content embedding <-> latent)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through `dims` with SiLU between them (none after the last)."""
    if len(dims) < 2:
        raise ValueError(f"mlp: need at least an input and an output size, got dims={list(dims)}")
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if k < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """content (B, d) -> latent (B, latent): an MLP through `hidden` (default 512, 256, 128)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (512, 256, 128), latent: int = 32):
        super().__init__()
        self.net = mlp([in_dim, *hidden, latent])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The latent of each row of `x`."""
        return self.net(x)


class Decoder(nn.Module):
    """latent (B, latent) -> reconstructed content (B, d): the encoder's mirror image."""

    def __init__(self, out_dim: int, hidden: Sequence[int] = (512, 256, 128), latent: int = 32):
        super().__init__()
        self.net = mlp([latent, *reversed(list(hidden)), out_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstructed content of each latent row."""
        return self.net(z)

"""The training loop shared by the retriever and the ranker, and its batching.

`train_epochs` runs seeded epochs of length-bucketed batches (`bucketed_batches`: random
order, similar lengths inside a batch, less padding) with bf16 autocast on CUDA
(`autocast`), clipping and a per-step LR schedule (`quasid.core.schedule.lr_factor`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def bucketed_batches(lengths: np.ndarray, batch_size: int, gen: torch.Generator
                     ) -> list[np.ndarray]:
    """Shuffled batches of indices whose members have similar lengths (less padding to compute).

    Indices are shuffled, cut into chunks of 32 batches, sorted by length within a chunk,
    batched, and the batches shuffled: random order, similar lengths inside a batch.
    """
    n = len(lengths)
    perm = torch.randperm(n, generator=gen).numpy()
    chunk = batch_size * 32
    batches = []
    for start in range(0, n, chunk):
        idx = perm[start:start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches.extend(idx[b:b + batch_size] for b in range(0, len(idx), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (small launch-bound matmuls: bf16 halves the traffic); off on CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_epochs(model: nn.Module, batch_loss, histories: np.ndarray, batch_size: int,
                 epochs: int, opt: torch.optim.Optimizer, sched, gen: torch.Generator, *,
                 grad_clip: float | None = None, epoch_setup=None, progress=None) -> list[float]:
    """The training loop of the retriever and the ranker; returns the mean loss per epoch.

    Each epoch: `epoch_setup()` (if given; e.g. the ranker's negatives, drawn from `gen`
    before the batches), then length-bucketed batches in a `gen`-seeded order, each one
    `batch_loss(idx, setup)` under autocast, backward, optional clipping, optimizer and
    scheduler steps. `progress(epoch, loss)` after each epoch.
    """
    device = next(model.parameters()).device
    n = len(histories)
    lengths = (np.asarray(histories) >= 0).sum(axis=1)
    losses = []
    model.train()
    for epoch in range(epochs):
        setup = epoch_setup() if epoch_setup is not None else None
        total_loss = torch.zeros((), device=device)
        for batch in bucketed_batches(lengths, batch_size, gen):
            idx = torch.as_tensor(batch, device=device)
            with autocast(device):
                loss = batch_loss(idx, setup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            total_loss += loss.detach() * len(idx)
        losses.append(float(total_loss) / n)
        if progress is not None:
            progress(epoch, losses[-1])
    model.eval()
    return losses

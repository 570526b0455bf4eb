"""The training loop shared by the retriever, the ranker and SASRec, and its batching.

`train_epochs` runs seeded epochs of length-bucketed batches (`bucketed_batches`: random
order, similar lengths inside a batch, less padding) with bf16 autocast on CUDA
(`autocast`), clipping and a per-step LR schedule (`quasid.core.schedule.lr_factor`).
With a `validate` callback it stops early: after every epoch it scores the model on
held-out requests (higher is better), keeps the best epoch's weights, stops after
`patience` epochs without a gain and ends with the best weights loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

BUCKET_CHUNK = 32
"""Batches per length-sorting chunk of `bucketed_batches`."""


def bucketed_batches(lengths: np.ndarray, batch_size: int, gen: torch.Generator
                     ) -> list[np.ndarray]:
    """Shuffled batches of indices whose members have similar lengths (less padding to compute).

    Indices are shuffled, cut into chunks of `BUCKET_CHUNK` batches, sorted by length within a
    chunk, batched, and the batches shuffled: random order, similar lengths inside a batch.
    """
    n = len(lengths)
    perm = torch.randperm(n, generator=gen).numpy()
    chunk = batch_size * BUCKET_CHUNK
    batches = []
    for start in range(0, n, chunk):
        idx = perm[start:start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches.extend(idx[b:b + batch_size] for b in range(0, len(idx), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def max_batches(n: int, batch_size: int) -> int:
    """The most batches `bucketed_batches` cuts `n` indices into (a short one per chunk)."""
    return math.ceil(n / batch_size) + math.ceil(n / (batch_size * BUCKET_CHUNK))


def optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model's parameters; fused into one kernel on the CPU (on a shared
    2-core box the per-parameter loop's many small ops were a sixth of a step), the
    per-parameter loop elsewhere."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=True if device.type == "cpu" else None)


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (small launch-bound matmuls: bf16 halves the traffic); off on CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class History:
    """What a training run went through: per-epoch mean losses, and with early stopping the
    validation score after each epoch, the best epoch (0-based; its weights are the model's)
    and whether training stopped before the configured epochs."""

    losses: list[float] = field(default_factory=list)
    valid: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False

    def summary(self) -> dict:
        """A JSON-ready record (the stack summary's `training` entry)."""
        return {"losses": self.losses, "valid": self.valid, "best_epoch": self.best_epoch,
                "epochs_run": len(self.losses), "stopped_early": self.stopped_early}


def train_epochs(model: nn.Module, batch_loss, histories: np.ndarray, batch_size: int,
                 epochs: int, opt: torch.optim.Optimizer, sched, gen: torch.Generator, *,
                 grad_clip: float | None = None, epoch_setup=None, progress=None,
                 validate=None, patience: int | None = None) -> History:
    """The training loop of the retriever, the ranker and SASRec; returns its `History`.

    Each epoch: `epoch_setup()` (if given; e.g. the ranker's negatives, drawn from `gen`
    before the batches), then length-bucketed batches in a `gen`-seeded order, each one
    `batch_loss(idx, setup)` under autocast, backward, optional clipping, optimizer and
    scheduler steps. `progress(epoch, loss)` after each epoch (with `validate`:
    `progress(epoch, loss, score)`). `validate()` -> float, higher is better, called in eval
    mode after each epoch: the best epoch's weights are restored at the end, and training
    stops once `patience` epochs in a row bring no gain (None: run all `epochs`).
    """
    device = next(model.parameters()).device
    n = len(histories)
    lengths = (np.asarray(histories) >= 0).sum(axis=1)
    history = History()
    losses = history.losses
    best_state = None
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
        if validate is None:
            if progress is not None:
                progress(epoch, losses[-1])
            continue
        model.eval()
        score = float(validate())
        model.train()
        history.valid.append(score)
        if progress is not None:
            progress(epoch, losses[-1], score)
        if history.best_epoch is None or score > history.valid[history.best_epoch]:
            history.best_epoch = epoch
            # a copy on the device: these models are small, and no host round trip
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif patience is not None and epoch - history.best_epoch >= patience:
            history.stopped_early = epoch + 1 < epochs
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history

"""Generative retrieval over SIDs (TIGER-style): a small encoder-decoder Transformer.

Input: the user's recent items (item rows, left-padded with -1, newest last), each spelled
as its full code (SID levels + collision rank, see `quasid.trie`), one token per level,
followed by an always-present end token (so an empty history still has something to
attend to). Output: the next item's code, one level at a time. Each level has its own
token range in one shared vocabulary (token = level offset + code), so the embedding and
output layers are shared while levels never mix.

Decoding is beam search constrained by the `SidTrie`: at each level a beam may only extend
its prefix with a token that leads to an existing item, so every result is a real item.
Beams of one request share the encoder memory: the decoder folds the beams into the
cross-attention's query axis instead of copying the memory once per beam.
The item score is log p(code) = the sum of the per-level log-probabilities (softmax over
the level's full vocabulary, as the model was trained; invalid tokens are then excluded).
`score_items` computes the same number by teacher forcing for any items, the brute-force
reference the beam search is tested against.
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

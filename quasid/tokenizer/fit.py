"""The tokenizers' seeded fit loop.

`fit_model`: k-means codebook init, AdamW with linear warm-up and cosine decay, bf16 autocast
on CUDA (the quantizer and the losses stay in fp32), gradient clipping, dead-code re-seeding
after each epoch, per-epoch losses and SID metrics, a rich progress bar, and a checkpoint
that a rerun with the same config resumes from (same seed, same result as an uninterrupted
run, on the CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quasid.core.io import write_atomic
from quasid.core.schedule import lr_factor, warmup_steps
from quasid.tokenizer.batches import Batch, BatchSampler, ConflictRule
from quasid.tokenizer.config import TrainConfig
from quasid.tokenizer.pairs import PairIndex

if TYPE_CHECKING:
    from quasid.tokenizer.config import TokenizerConfig
    from quasid.tokenizer.model import SIDModel


log = logging.getLogger(__name__)


def all_codes(model: SIDModel, content: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """(n, L) codes of every raw content row, in chunks (on the content's device)."""
    return torch.cat([model.codes(content[s:s + chunk]) for s in range(0, content.shape[0], chunk)])


def code_summary(codes: torch.Tensor, codebook_size: int) -> dict:
    """Collision rate, unique SIDs and per-level utilization (the cheap per-epoch metrics)."""
    unique = int(torch.unique(codes, dim=0).shape[0])
    util = [float((torch.bincount(codes[:, k], minlength=codebook_size) > 0).float().mean())
            for k in range(codes.shape[1])]
    return {"collision_rate": 1.0 - unique / codes.shape[0], "unique_sids": unique,
            "utilization": util}


def conflict_rule(cfg: TokenizerConfig) -> ConflictRule | None:
    """The conflict-mining rule of `cfg` (`train.mine_conflicts`): HaMR's CVPM mask, else
    uniform's; None without mining or without a repulsion to mine for."""
    if not cfg.train.mine_conflicts:
        return None
    if cfg.hamr:
        return ConflictRule(cfg.max_hamming, cfg.tau_dup, exempt_positives=True)
    if cfg.uniform:
        return ConflictRule(cfg.uniform_h_max, cfg.uniform_tau_dup)
    return None


def build_optimizer(model: SIDModel, tc: TrainConfig, total_steps: int, device: torch.device
                    ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                               torch.optim.lr_scheduler.LRScheduler]:
    """(trainable params, AdamW (fused on CUDA), warm-up + cosine LR schedule per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type == "cuda")
    warm = warmup_steps(tc.warmup_share, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, tc.final_lr_share))
    return params, optimizer, scheduler


def train_step(loss_fn, batch: Batch, progress: float, params: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, scheduler, grad_clip: float, amp: bool
               ) -> dict[str, torch.Tensor]:
    """One optimization step (bf16 autocast when `amp`); returns the detached loss terms.

    Nothing in it waits for the device, so steps queue up on a GPU.
    """
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=amp):
        total, terms = loss_fn(batch, progress)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        # the pre-clip norm shows how often clipping rescales (and so re-weights) the step
        terms = {**terms, "grad_norm": torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()}
    optimizer.step()
    scheduler.step()
    return terms


def _load_checkpoint(path: Path | None, cfg: TokenizerConfig) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # read through the config class: a checkpoint from before a field existed holds that
    # field's default, so the same training
    saved = state.get("config")
    try:
        same = type(cfg).from_dict(saved).to_dict() == cfg.to_dict()
    except (TypeError, ValueError):  # unknown or invalid keys: another config
        same = False
    if not same:
        log.warning("%s: checkpoint of another config; training from scratch", path)
        return None
    return state


def fit_model(model: SIDModel, content: torch.Tensor, pairs: np.ndarray, cfg: TokenizerConfig,
              generator: torch.Generator, *, device: str = "cpu", checkpoint: Path | None = None,
              progress: bool = False, callback=None, probe=None) -> dict:
    """Train `model` on raw `content` (n, d, on `device`) with positive `pairs` (rows).

    Returns the history: {"init": SID metrics after the k-means init, "epochs": [per-epoch
    record], "train_seconds": wall time}. Each
    record holds the mean of every loss term over the epoch's steps, the SID metrics of all
    fit items after the epoch, dead codes re-seeded per level and (with HaMR) CVPM's
    exclusion counts. `callback(record)` runs after each epoch (an exception stops training;
    the last checkpoint stays). A `probe` (`diagnostics.PairProbe`) sees each batch before
    its step and adds its epoch statistics under `record["probe"]`; it changes nothing the
    fit computes.
    """
    from quasid.tokenizer.losses import CVPM_REASONS

    tc = cfg.train
    dev = torch.device(device)
    n = content.shape[0]
    sampler = BatchSampler(model.standardize(content), content, PairIndex(pairs, n, dev),
                           tc.batch_size, generator, tc.neighbours,
                           need_positive=cfg.needs_pairs,
                           near_duplicate=cfg.tau_dup if cfg.hamr else None,
                           conflicts=conflict_rule(cfg))
    steps = sampler.steps_per_epoch
    total_steps = tc.epochs * steps
    params, optimizer, scheduler = build_optimizer(model, tc, total_steps, dev)
    history: dict = {"epochs": [], "train_seconds": 0.0}
    start = 0
    state = _load_checkpoint(checkpoint, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        sampler.load_state(state["sampler"])
        history, start = state["history"], int(state["epoch"])
    else:
        with torch.no_grad():
            model.quantizer.init_kmeans(model.encoder(sampler.x).float(), generator,
                                        cfg.kmeans_iters)
        codes = all_codes(model, content)
        history["init"] = code_summary(codes, cfg.codebook_size)
        sampler.set_codes(codes)
    amp = tc.amp and dev.type == "cuda"
    loss_fn = torch.compile(model.losses) if tc.compile else model.losses
    bar = _Bar(progress, total_steps, start * steps)
    began = time.perf_counter() - history["train_seconds"]
    with bar:
        for epoch in range(start, tc.epochs):
            model.train()
            sampler.new_epoch()
            sums: dict[str, torch.Tensor] = {}
            for step in range(steps):
                done = (epoch * steps + step) / total_steps
                batch = sampler.batch(step)
                if probe is not None:
                    probe.step(model, batch, optimizer, done, sampler.x)
                terms = train_step(loss_fn, batch, done, params, optimizer, scheduler,
                                   tc.grad_clip, amp)
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
                bar.advance()
            record: dict = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
            for key, value in sums.items():
                if key == "cvpm_excluded":
                    record[key] = dict(zip(CVPM_REASONS, (int(v) for v in value.tolist())))
                else:
                    record[key] = float(value) / steps
            last = epoch + 1 == tc.epochs
            if tc.reseed_every and (epoch + 1) % tc.reseed_every == 0 \
                    and epoch + 1 <= tc.reseed_until * tc.epochs:
                record["reseeded"] = model.quantizer.reseed_dead(generator)
            if (epoch + 1) % tc.eval_every == 0 or last:
                model.eval()
                codes = all_codes(model, content)
                record.update(code_summary(codes, cfg.codebook_size))
                sampler.set_codes(codes)
            if probe is not None:
                model.eval()
                probe_codes = codes if "collision_rate" in record else all_codes(model, content)
                record["probe"] = probe.epoch(model, sampler.x, probe_codes)
            record["seconds"] = time.perf_counter() - began
            history["epochs"].append(record)
            history["train_seconds"] = record["seconds"]
            bar.describe(_describe(record, tc.epochs))
            if checkpoint is not None and ((epoch + 1) % tc.checkpoint_every == 0 or last):
                saved = {"config": cfg.to_dict(), "epoch": epoch + 1,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "generator": generator.get_state(), "sampler": sampler.state(),
                             "history": history}
                write_atomic(checkpoint, lambda fh: torch.save(saved, fh))
            if callback is not None:
                callback(record)
    model.eval()
    return history


def _describe(record: dict, epochs: int) -> str:
    coll = record.get("collision_rate")
    text = f"epoch {record['epoch']}/{epochs} loss {record['total']:.4f}"
    return text + (f" collisions {coll:.3f}" if coll is not None else "")


class _Bar:
    """A rich progress bar over training steps; does nothing when disabled (quiet runs, tests)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("training", total=total, completed=done)

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self) -> None:
        """One step done."""
        if self.progress is not None:
            self.progress.advance(self.task)

    def describe(self, text: str) -> None:
        """Show `text` beside the bar."""
        if self.progress is not None:
            self.progress.update(self.task, description=text)

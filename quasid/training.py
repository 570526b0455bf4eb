"""Training the SID tokenizers: the seeded fit loop and the `train` pipeline over a dataset folder.

`fit_model` is the loop: k-means codebook init, AdamW with linear warm-up and cosine decay,
bf16 autocast on CUDA (the quantizer and the losses stay in fp32), gradient clipping,
dead-code re-seeding after each epoch, per-epoch losses and SID metrics, a rich progress
bar, and a checkpoint that a rerun with the same config resumes from (same seed, same
result as an uninterrupted run, on the CPU).

`train_tokenizer` is what `quasid train` and the flows call: data folder in, SID table,
tokenizer, metrics and plot out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quasid.batches import Batch, BatchSampler
from quasid.pairs import PairIndex

if TYPE_CHECKING:
    from quasid.tokenizers import SIDModel, TokenizerConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SIDS_FILE = "sids.parquet"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "training.png"


@dataclass(frozen=True)
class TrainConfig:
    """How a neural tokenizer trains (shared by all of them)."""

    epochs: int = 75
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_share: float = 0.05
    final_lr_share: float = 0.05
    grad_clip: float = 1.0
    neighbours: int = 8
    reseed_every: int = 1
    reseed_until: float = 0.8
    eval_every: int = 1
    checkpoint_every: int = 10
    amp: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        bad = {k: getattr(self, k) for k, ok in {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 4 and self.batch_size % 4 == 0,
            "lr": self.lr > 0, "warmup_share": 0 <= self.warmup_share < 1,
            "final_lr_share": 0 <= self.final_lr_share <= 1, "eval_every": self.eval_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1, "reseed_every": self.reseed_every >= 0,
        }.items() if not ok}
        if bad:
            raise ValueError(f"TrainConfig: invalid value(s) {bad}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict (lists become tuples); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown} (known: {sorted(known)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary sibling and a rename (no half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lr_factor(step: int, total: int, warmup_share: float, final_share: float) -> float:
    """Linear warm-up over `warmup_share` of the steps, then cosine decay to `final_share`."""
    warm = max(1, int(round(warmup_share * total)))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return final_share + (1 - final_share) * 0.5 * (1 + math.cos(math.pi * t))


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


def build_optimizer(model: SIDModel, tc: TrainConfig, total_steps: int, device: torch.device
                    ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                               torch.optim.lr_scheduler.LRScheduler]:
    """(trainable params, AdamW (fused on CUDA), warm-up + cosine LR schedule per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, tc.warmup_share, tc.final_lr_share))
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
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return terms


def _load_checkpoint(path: Path | None, cfg: TokenizerConfig) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != cfg.to_dict():
        log.warning("%s: checkpoint of another config; training from scratch", path)
        return None
    return state


def fit_model(model: SIDModel, content: torch.Tensor, pairs: np.ndarray, cfg: TokenizerConfig,
              generator: torch.Generator, *, device: str = "cpu", checkpoint: Path | None = None,
              progress: bool = False, callback=None) -> dict:
    """Train `model` on raw `content` (n, d, on `device`) with positive `pairs` (rows).

    Returns the history: {"init": SID metrics after the k-means init, "epochs": [per-epoch
    record], "train_seconds": wall time}. Each
    record holds the mean of every loss term over the epoch's steps, the SID metrics of all
    fit items after the epoch, dead codes re-seeded per level and (with HaMR) CVPM's
    exclusion counts. `callback(record)` runs after each epoch (an exception stops training;
    the last checkpoint stays).
    """
    from quasid.losses import CVPM_REASONS

    tc = cfg.train
    dev = torch.device(device)
    n = content.shape[0]
    sampler = BatchSampler(model.standardize(content), content, PairIndex(pairs, n, dev),
                           tc.batch_size, generator, tc.neighbours,
                           need_positive=cfg.needs_pairs)
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
                terms = train_step(loss_fn, sampler.batch(step), done, params, optimizer,
                                   scheduler, tc.grad_clip, amp)
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
            record["seconds"] = time.perf_counter() - began
            history["epochs"].append(record)
            history["train_seconds"] = record["seconds"]
            bar.describe(_describe(record, tc.epochs))
            if checkpoint is not None and ((epoch + 1) % tc.checkpoint_every == 0 or last):
                save_atomic({"config": cfg.to_dict(), "epoch": epoch + 1,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "generator": generator.get_state(), "sampler": sampler.state(),
                             "history": history}, checkpoint)
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
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

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


def training_interactions(ds) -> object:
    """The interactions the tokenizer may learn from: before the cutoff, or the leave-one-out
    train part without cold items when the dataset has no global time."""
    import polars as pl

    from quasid.data.splits import leave_one_out, time_split

    if ds.cutoff_ts is not None:
        return time_split(ds.interactions, ds.cutoff_ts)[0]
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    return leave_one_out(ds.interactions, cold_items=cold).train


def train_tokenizer(data_dir: Path, tokenizer: str, out_dir: Path, *, device: str = "cpu",
                    epochs: int | None = None, seed: int = 0, overrides: dict | None = None
                    ) -> dict:
    """Train `tokenizer` on a dataset folder and write its outputs to `out_dir`.

    Fits on the warm items (`is_cold` false) with collaborative positives from the training
    interactions only, assigns SIDs to ALL items (cold ones from content alone) and writes
    `sids.parquet` (SID_TABLE), `tokenizer.pt` + `tokenizer.json`, `metrics.json`
    (`sid_metrics` plus run facts), `history.json` and `training.png`; the outputs appear
    together or not at all (`checkpoint.pt` is kept for resuming). Returns the metrics.
    """
    from quasid.contracts import SID_TABLE, staged_dir, write_parquet, write_text_atomic
    from quasid.data.dataset import load_dataset
    from quasid.pairs import collaborative_pairs, pairs_to_rows
    from quasid.sid_metrics import sid_metrics
    from quasid.sids import sid_table
    from quasid.tokenizer_plots import plot_training
    from quasid.tokenizers import make_tokenizer

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train_tokenizer: device {device!r} asked for, but CUDA is not available")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ds = load_dataset(data_dir)
    tok = make_tokenizer(tokenizer, overrides)
    train_over = {"seed": seed} | ({"epochs": epochs} if epochs is not None else {})
    tok.config = replace(tok.config, train=replace(tok.config.train, **train_over))

    item_ids = ds.items["item_id"].to_numpy()
    content = ds.content()
    warm = ~ds.items["is_cold"].to_numpy()
    if warm.sum() < 2:
        raise ValueError(f"{data_dir}: fewer than 2 warm items (is_cold false) to fit on")
    pairs = collaborative_pairs(training_interactions(ds), window=tok.config.pair_window,
                                min_count=tok.config.pair_min_count)
    rows = pairs_to_rows(pairs, item_ids[warm])
    started = time.perf_counter()
    history = tok.fit(content[warm], rows, device=device, checkpoint=out_dir / CHECKPOINT_FILE,
                      progress=True)
    fit_seconds = time.perf_counter() - started
    codes = tok.encode(content, device=device)
    metrics = sid_metrics(codes, tok.config.codebook_size, item_ids, ds.world)
    cold_rows = ~warm
    last = history["epochs"][-1] if history["epochs"] else {}
    metrics.update({
        "tokenizer": tokenizer,
        "dataset": ds.name,
        "device": str(device),
        "seed": seed,
        "epochs": tok.config.train.epochs if tok.config.neural else 0,
        "fit_items": int(warm.sum()),
        "positive_pairs": int(len(rows)),
        "fit_seconds": fit_seconds,
        "train_seconds": float(history.get("train_seconds", 0.0)),
        "final_losses": {k: v for k, v in last.items()
                         if isinstance(v, float) and k not in ("lr", "seconds", "collision_rate")},
        "cold_items": int(cold_rows.sum()),
    })
    table = sid_table(item_ids, codes, tokenizer)
    with staged_dir(out_dir) as tmp:
        write_parquet(table, tmp / SIDS_FILE, SID_TABLE)
        tok.save(tmp)
        write_text_atomic(json.dumps(metrics, indent=2, sort_keys=True) + "\n", tmp / METRICS_FILE)
        write_text_atomic(json.dumps(history, indent=2, sort_keys=True) + "\n", tmp / HISTORY_FILE)
        plot_training(history, metrics, tmp / PLOT_FILE, title=f"{tokenizer} on {ds.name}")
    return metrics


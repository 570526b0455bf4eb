"""The tokenizers' seeded fit loop.

`fit_model`: k-means codebook init, AdamW with linear warm-up and cosine decay, bf16 autocast
on CUDA (the quantizer and the losses stay in fp32), gradient clipping, dead-code re-seeding
after each epoch, optionally the whole step as one CUDA graph (`train.cuda_graph`,
`GraphedStep`), per-epoch losses and SID metrics, a rich progress bar, and a checkpoint
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
from quasid.tokenizer.batches import Batch, BatchSampler, ConflictRule, to_device
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


def build_optimizer(model: SIDModel, tc: TrainConfig, total_steps: int, device: torch.device,
                    capturable: bool = False
                    ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                               torch.optim.lr_scheduler.LRScheduler]:
    """(trainable params, AdamW (fused on CUDA), warm-up + cosine LR schedule per step).

    With `capturable` (CUDA only, for `GraphedStep`) AdamW may be captured in a CUDA graph and
    its lr is a 0-d device tensor (`tensor_lr`) that the scheduler fills in place.
    """
    device = torch.device(device)
    if capturable and device.type != "cuda":
        raise ValueError(f"build_optimizer: capturable=True needs CUDA, got device {device}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type == "cuda", capturable=capturable)
    warm = warmup_steps(tc.warmup_share, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, tc.final_lr_share))
    if capturable:
        # after the scheduler: its base lrs stay floats, so its step computes a float and
        # fills the tensor (a tensor base lr would cost a kernel per step and a tensor lr log)
        tensor_lr(optimizer)
    return params, optimizer, scheduler


def tensor_lr(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Make each param group's lr a 0-d float32 tensor on its parameters' device (kept when it
    is one already) and return them.

    A CUDA graph bakes a float lr into its AdamW kernel; it reads a tensor lr from memory, so
    the scheduler's in-place `fill_` (`LRScheduler.step` on a tensor lr) reaches the replays.
    """
    out = []
    for group in optimizer.param_groups:
        device = group["params"][0].device
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device and lr.dim() == 0
                and lr.dtype == torch.float32):
            # a float, or a tensor loaded from a checkpoint onto the CPU
            lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
            group["lr"] = lr
        out.append(lr)
    return out


def _step(loss_fn, batch: Batch, progress, params: list[torch.nn.Parameter],
          optimizer: torch.optim.Optimizer, grad_clip: float, amp: bool,
          cache: bool | None = None) -> dict[str, torch.Tensor]:
    """Forward, backward, clipping and AdamW (no LR schedule): the part a CUDA graph holds.

    `cache=False` turns autocast's weight-cast cache off (required under graph capture).
    Measured on an H200 under bf16: the same values for rqvae, quasid and uniform, while
    AdaSID's steps drift from eager ones (tests/quasid/test_graphed_step.py); fp32 is bitwise.
    """
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=amp,
                        cache_enabled=cache):
        total, terms = loss_fn(batch, progress)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        # the pre-clip norm shows how often clipping rescales (and so re-weights) the step
        terms = {**terms, "grad_norm": torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()}
    optimizer.step()
    return terms


def train_step(loss_fn, batch: Batch, progress: float, params: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, scheduler, grad_clip: float, amp: bool
               ) -> dict[str, torch.Tensor]:
    """One optimization step (bf16 autocast when `amp`); returns the detached loss terms.

    Nothing in it waits for the device, so steps queue up on a GPU.
    """
    terms = _step(loss_fn, batch, progress, params, optimizer, grad_clip, amp)
    scheduler.step()
    return terms


class GraphedStep:
    """`train_step` as one CUDA graph replay: the batch's assembly on the device, forward,
    losses, backward, clipping and AdamW.

    Called like `train_step`, but with the sampler's CPU draw (`BatchSampler.draw`) where
    `train_step` takes a batch: one optimization step per call, the LR schedule stepped after
    it outside the graph, so a loop of calls trains exactly as a loop of `train_step` calls on
    `sampler.batch`. Each call copies the draw into a static device buffer (one copy); the
    graph reads it, gathers the content and builds P (`assemble`, `BatchSampler.assemble`),
    so the host's share of a step is the draw, the copy and the replay. The first `warmup`
    calls are ordinary eager steps on a side stream (they create AdamW's state and the
    libraries' workspaces before capture); the next call captures the step on that stream and
    replays it. The terms it returns are the graph's static outputs, overwritten by the next
    call: read, clone or add them before it; `batch` is the last step's batch, likewise.

    Needs the dense pair path (the B × B positive mask: the sparse pair lists have
    data-dependent shapes), an AdamW with `capturable=True` (`build_optimizer(...,
    capturable=True)`; its lr becomes a device tensor, `tensor_lr`), no EMA codebooks
    (their update syncs with the host), and the same loss function, parameters, optimizer,
    clipping and amp on every call: they are baked into the graph at capture.

    With `capture=False` every call runs the same static-buffer step eagerly, on any device:
    the CPU tests exercise the copies and the step through it.
    """

    def __init__(self, assemble, capture: bool = True, warmup: int = 3):
        if warmup < 1:
            # AdamW creates its state on its first step: inside a capture every replay would
            # re-zero the moments
            raise ValueError(f"GraphedStep: warmup must be >= 1, got {warmup}")
        self.assemble, self.capture, self.warmup = assemble, capture, warmup
        self.calls = 0
        self.graph = None
        self.drawn: torch.Tensor | None = None  # the static input: the draw on the device
        self.batch: Batch | None = None
        self.progress: torch.Tensor | None = None
        self.terms: dict[str, torch.Tensor] | None = None
        self._lrs: list[torch.Tensor] | None = None
        self._stream = None

    def __call__(self, loss_fn, drawn: torch.Tensor, progress: float,
                 params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                 grad_clip: float, amp: bool) -> dict[str, torch.Tensor]:
        """One optimization step on the batch of `drawn` (see the class docstring); the
        detached terms."""
        if self.drawn is None:
            self._setup(loss_fn, drawn, params[0].device, optimizer)
        self._load(drawn, progress)
        args = (loss_fn, self.progress, params, optimizer, grad_clip, amp)
        if self.graph is not None:
            self.graph.replay()
            terms = dict(self.terms)
        elif not self.capture:
            terms = self._step(*args)
        elif self.calls < self.warmup:
            # the whole-network recipe: warm-up steps on the stream that will capture
            current = torch.cuda.current_stream()
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                terms = self._step(*args)
            current.wait_stream(self._stream)
        else:
            terms = self._capture(args, optimizer)
        scheduler.step()
        if self._lrs is not None:
            self._repin_lr(optimizer)
        self.calls += 1
        return terms

    def _step(self, loss_fn, progress, params, optimizer, grad_clip, amp
              ) -> dict[str, torch.Tensor]:
        self.batch = self.assemble(self.drawn)
        return _step(loss_fn, self.batch, progress, params, optimizer, grad_clip, amp,
                     cache=False)

    def _setup(self, loss_fn, drawn: torch.Tensor, device: torch.device,
               optimizer: torch.optim.Optimizer) -> None:
        owner = getattr(loss_fn, "__self__", None)  # the SIDModel of a bound `model.losses`
        if owner is not None and hasattr(owner, "sparse_pairs"):
            sparse = owner.sparse_pairs if owner.sparse_pairs is not None \
                else device.type == "cpu"
            if sparse:
                raise ValueError("GraphedStep: needs the dense pair path (model.sparse_pairs = "
                                 "False; the sparse pair lists have data-dependent shapes)")
            if getattr(owner.quantizer, "ema", False) and self.capture:
                raise ValueError("GraphedStep: EMA codebooks (ema: true) cannot be captured "
                                 "(their update syncs with the host)")
        if self.capture:
            if device.type != "cuda":
                raise ValueError(f"GraphedStep: capture needs CUDA parameters, got {device} "
                                 "(capture=False runs the same step eagerly)")
            if not all(group.get("capturable") for group in optimizer.param_groups):
                raise ValueError("GraphedStep: AdamW needs capturable=True "
                                 "(build_optimizer(..., capturable=True))")
            self._lrs = tensor_lr(optimizer)
            self._stream = torch.cuda.Stream(device)
            # the warm-up steps run uncaptured on purpose: no "capturable=True can impair
            # performance" warning for them
            optimizer._warned_capturable_if_run_uncaptured = True
        self.drawn = torch.empty(drawn.shape, dtype=drawn.dtype, device=device)
        # float64, as the Python float `train_step` passes: AdaSID's ρ(t) rounds the same
        self.progress = torch.zeros((), dtype=torch.float64, device=device)

    def _load(self, drawn: torch.Tensor, progress: float) -> None:
        if drawn.shape != self.drawn.shape or drawn.dtype != self.drawn.dtype:
            # copy_ would broadcast a smaller draw, or cast another dtype, silently
            raise ValueError(f"GraphedStep: the draw changed from {tuple(self.drawn.shape)} "
                             f"{self.drawn.dtype} to {tuple(drawn.shape)} {drawn.dtype}")
        to_device(drawn, self.drawn.device, out=self.drawn)
        self.progress.fill_(progress)

    def _capture(self, args: tuple, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        # grads None before capture: backward then allocates them in the graph's pool and
        # every replay overwrites them (no zeroing needed between replays)
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            terms = self._step(*args)
        # capture records the kernels without running them: this call's step is the replay
        graph.replay()
        self.graph, self.terms = graph, terms
        return dict(terms)

    def _repin_lr(self, optimizer: torch.optim.Optimizer) -> None:
        # the scheduler fills tensor lrs in place (torch >= 2.x); should one assign a new
        # value instead, copy it into the tensor the graph reads and put that back
        for group, lr in zip(optimizer.param_groups, self._lrs):
            value = group["lr"]
            if value is not lr:
                lr.fill_(float(value))
                group["lr"] = lr


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
                           conflicts=conflict_rule(cfg), sparse=model.sparse_pairs)
    steps = sampler.steps_per_epoch
    total_steps = tc.epochs * steps
    # CUDA graphs only where there is CUDA (the flag is ignored on the CPU)
    graphed = tc.cuda_graph and dev.type == "cuda"
    params, optimizer, scheduler = build_optimizer(model, tc, total_steps, dev,
                                                   capturable=graphed)
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
    # one graph for the whole fit: captured on the first steps after the warm-up (which are
    # real steps), replayed on every later one; the terms it returns are added up below
    # (a new tensor each step) before the next replay overwrites them
    # the graph assembles each batch from the sampler's draw on the device
    step_fn = GraphedStep(sampler.assemble) if graphed else train_step
    bar = _Bar(progress, total_steps, start * steps)
    began = time.perf_counter() - history["train_seconds"]
    with bar:
        for epoch in range(start, tc.epochs):
            model.train()
            sampler.new_epoch()
            sums: dict[str, torch.Tensor] = {}
            for step in range(steps):
                done = (epoch * steps + step) / total_steps
                drawn = sampler.draw(step)
                batch = sampler.to_batch(drawn) if probe is not None or not graphed else None
                if probe is not None:
                    probe.step(model, batch, optimizer, done, sampler.x)
                terms = step_fn(loss_fn, drawn if graphed else batch, done, params, optimizer,
                                scheduler, tc.grad_clip, amp)
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
                bar.advance()
            # float(): with a tensor lr (CUDA graphs) the scheduler reports tensors
            record: dict = {"epoch": epoch + 1, "lr": float(scheduler.get_last_lr()[0])}
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

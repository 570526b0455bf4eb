"""The tokenizer stage: a dataset folder in; SID table, tokenizer, metrics and plot out.

`train_tokenizer` is what `quasid train` and the flows call.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quasid.core.config import merge
from quasid.core.io import staged_dir, write_text_atomic
from quasid.core.layout import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    PLOT_FILE,
    SIDS_FILE,
    TOKENIZER_METRICS_FILE,
)
from quasid.core.schemas import SID_TABLE, write_parquet
from quasid.data.dataset import load_dataset
from quasid.data.splits import training_interactions
from quasid.tokenizer.diagnostics import PairProbe, world_pair_rows
from quasid.tokenizer.metrics import sid_metrics
from quasid.tokenizer.pairs import collaborative_pairs, pairs_to_rows
from quasid.tokenizer.plots import plot_training
from quasid.tokenizer.sids import sid_table
from quasid.tokenizer.tokenizer import make_tokenizer


def train_tokenizer(data_dir: Path, tokenizer: str, out_dir: Path, *, device: str = "cpu",
                    epochs: int | None = None, seed: int = 0, overrides: dict | None = None,
                    diagnose: bool = False, forces_every: int = 0) -> dict:
    """Train `tokenizer` on a dataset folder and write its outputs to `out_dir`.

    Fits on the warm items (`is_cold` false) with collaborative positives from the training
    interactions only, assigns SIDs to ALL items (cold ones from content alone) and writes
    `sids.parquet` (SID_TABLE), `tokenizer.pt` + `tokenizer.json`, `metrics.json`
    (`sid_metrics` plus run facts), `history.json` and `training.png`; the outputs appear
    together or not at all (`checkpoint.pt` is kept for resuming). Returns the metrics.
    With `diagnose` on a synthetic world, a `PairProbe` watches the look-alike (`harmful`)
    and near-duplicate (`benign`) pairs whose items are both fit items; its per-epoch
    statistics land in `history.json` under each epoch's `probe` (with `forces_every` = k,
    the per-loss-term forces on those pairs at every k-th step).
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train_tokenizer: device {device!r} asked for, but CUDA is not available")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ds = load_dataset(data_dir)
    tok = make_tokenizer(tokenizer, overrides)
    train_over = {"seed": seed} | ({"epochs": epochs} if epochs is not None else {})
    tok.config = merge(tok.config, {"train": train_over}, "train_tokenizer")

    item_ids = ds.items["item_id"].to_numpy()
    content = ds.content()
    warm = ~ds.items["is_cold"].to_numpy()
    if warm.sum() < 2:
        raise ValueError(f"{data_dir}: fewer than 2 warm items (is_cold false) to fit on")
    pairs = collaborative_pairs(training_interactions(ds), window=tok.config.pair_window,
                                min_count=tok.config.pair_min_count)
    rows = pairs_to_rows(pairs, item_ids[warm])
    probe = None
    if diagnose:
        if ds.world is None:
            raise ValueError(f"{data_dir}: --diagnose needs a synthetic world (world.npz)")
        fit_ids = item_ids[warm]
        groups = {"harmful": world_pair_rows(ds.world.lookalike_pairs, fit_ids),
                  "benign": world_pair_rows(ds.world.benign_pairs(), fit_ids)}
        probe = PairProbe(groups, rows, len(fit_ids), tok.config, device, seed=seed,
                          forces_every=forces_every)
    started = time.perf_counter()
    history = tok.fit(content[warm], rows, device=device, checkpoint=out_dir / CHECKPOINT_FILE,
                      progress=True, probe=probe)
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
                         if isinstance(v, float)
                         and k not in ("lr", "seconds", "collision_rate", "grad_norm")},
        "cold_items": int(cold_rows.sum()),
    })
    table = sid_table(item_ids, codes, tokenizer)
    with staged_dir(out_dir) as tmp:
        write_parquet(table, tmp / SIDS_FILE, SID_TABLE)
        tok.save(tmp)
        write_text_atomic(json.dumps(metrics, indent=2, sort_keys=True) + "\n", tmp / TOKENIZER_METRICS_FILE)
        write_text_atomic(json.dumps(history, indent=2, sort_keys=True) + "\n", tmp / HISTORY_FILE)
        plot_training(history, metrics, tmp / PLOT_FILE, title=f"{tokenizer} on {ds.name}")
    return metrics

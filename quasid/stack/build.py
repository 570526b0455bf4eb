"""The stack stage: train a SID stack on a dataset folder and one SID table, and save it.

`train_stack` trains the retriever and the ranker on training interactions (before
`ds.cutoff_ts` when the dataset has a clock, else the leave-one-out training part, cold
items dropped), counts its transitions (`quasid.stack.transitions.FollowerTable`) and fits
the weights of the retriever's log p and of the transition log p_T in the final score on
validation requests. `build_stack` is what the flows and `quasid eval` call: folder in,
`stack.pt` + `stack.json` out, both or neither.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from quasid.core.io import staged_dir
from quasid.core.layout import STACK_FILE, SUMMARY_FILE
from quasid.core.schemas import SID_TABLE, ContractError, read_parquet
from quasid.data.sequences import row_mapper, sample_windows, training_windows, validation_requests
from quasid.data.splits import training_interactions
from quasid.stack.config import StackConfig, stack_config
from quasid.stack.ranker import Ranker, train_ranker
from quasid.stack.retriever import Retriever, train_retriever
from quasid.stack.serving import Stack
from quasid.stack.transitions import FollowerTable
from quasid.stack.trie import SidTrie, full_codes


def _epoch_logger(label: str, epochs: int, enabled: bool):
    if not enabled:
        return None
    from rich.console import Console

    console = Console(stderr=True)

    def log(epoch: int, loss: float, score: float | None = None) -> None:
        valid = "" if score is None else f" valid hr@10 {score:.4f}"
        console.log(f"{label}: epoch {epoch + 1}/{epochs} loss {loss:.4f}{valid}", markup=False)
    return log


def train_stack(
    items: pl.DataFrame,
    sid_table: pl.DataFrame,
    train: pl.DataFrame,
    cfg: StackConfig = StackConfig(),
    *,
    device: str = "cpu",
    seed: int = 0,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
    source: str = "<sid table>",
) -> tuple[Stack, dict]:
    """Train the retriever and the ranker on `train` interactions; returns (stack, summary).

    `sid_table` must give a SID to exactly the items of `items` (errors name `source`).
    `valid` = (histories, target ids) of held-out requests: the retrieval and transition
    weights of the final score are then fitted on them (`Stack.fit_score_weights`), else
    kept as configured. The summary holds the counts, the per-epoch losses, the fitted
    weights and the times.
    """
    item_ids, codes = full_codes(sid_table, source)
    catalog = np.sort(items["item_id"].to_numpy())
    if len(catalog) != len(item_ids) or (catalog != item_ids).any():
        missing = np.setdiff1d(catalog, item_ids)[:5].tolist()
        extra = np.setdiff1d(item_ids, catalog)[:5].tolist()
        raise ContractError(f"{source}: column 'item_id': the sid table does not cover the catalog "
                            f"(items without a SID: {missing}; SIDs of unknown items: {extra})")
    rows_of = row_mapper(item_ids, "training interactions")
    price = items.sort("item_id")["price"].to_numpy()
    popularity = np.bincount(rows_of(train["item_id"].to_numpy()), minlength=len(item_ids))
    warm = popularity > 0
    if not warm.any():
        raise ContractError("training interactions: empty (expected logged interactions to train on)")
    torch.manual_seed(seed)
    tokenizer = str(sid_table["tokenizer"][0])
    timings = {}

    start, cpu = time.perf_counter(), time.process_time()
    retriever = Retriever(SidTrie.from_codes(codes), cfg.retriever).to(device)
    hist, tgt = sample_windows(*training_windows(train, rows_of, cfg.retriever.max_history),
                         cfg.max_train_windows, seed)
    valid_rows = None if valid is None else (rows_of(valid[0]), rows_of(valid[1]))
    r_hist = train_retriever(retriever, hist, tgt, seed=seed, valid=valid_rows,
                             progress=_epoch_logger(f"retriever[{tokenizer}]",
                                                    cfg.retriever.epochs, progress))
    timings["retriever_s"] = time.perf_counter() - start
    timings["retriever_cpu_s"] = time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    ranker = Ranker(codes[:, :-1], warm, cfg.ranker).to(device)
    if cfg.ranker.max_history != cfg.retriever.max_history:
        hist, tgt = sample_windows(*training_windows(train, rows_of, cfg.ranker.max_history),
                             cfg.max_train_windows, seed)
    k_hist = train_ranker(ranker, hist, tgt, np.flatnonzero(warm), seed=seed, progress=_epoch_logger(
        f"ranker[{tokenizer}]", cfg.ranker.epochs, progress))
    timings["ranker_s"] = time.perf_counter() - start
    timings["ranker_cpu_s"] = time.process_time() - cpu  # all threads: robust to a shared box

    start = time.perf_counter()
    transitions = FollowerTable.from_config(train, rows_of, popularity, cfg.transitions)
    timings["transitions_s"] = time.perf_counter() - start
    stack = Stack(item_ids, retriever, ranker, popularity, price, cfg, tokenizer, device,
                  transitions)
    weight_fit = bias_fit = None
    if valid is not None:
        start = time.perf_counter()
        weight_fit = [{"retrieval_weight": w, "transition_weight": tw, "ndcg@10": v}
                      for (w, tw), v in stack.fit_score_weights(*valid).items()]
        sample = sample_windows(*valid, cfg.cold_bias_requests, seed)
        bias_fit = {str(b): v for b, v in stack.fit_cold_bias(*sample).items()}
        timings["weight_fit_s"] = time.perf_counter() - start
    summary = {
        "tokenizer": tokenizer,
        "seed": seed,
        "device": str(device),
        "config": cfg.model_dump(),
        "counts": {"items": len(item_ids), "warm_items": int(warm.sum()),
                   "train_interactions": train.height, "train_windows": len(tgt),
                   "sid_depth": int(codes.shape[1])},
        "losses": {"retriever": r_hist.losses, "ranker": k_hist.losses},
        "retriever_training": r_hist.summary(),
        "retrieval_weight": stack.cfg.retrieval_weight,
        "transition_weight": stack.cfg.transitions.weight,
        "weight_fit_ndcg@10": weight_fit,
        "cold_bias": stack.cfg.cold_bias,
        "cold_bias_fit": bias_fit,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    return stack, summary


def build_stack(
    data_dir: Path,
    sids_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    overrides: dict | None = None,
    progress: bool = False,
) -> Path:
    """Train a stack on a dataset folder's training interactions and one SID table; save it.

    Writes `out_dir/stack.pt` (load with `Stack.load`) and `out_dir/stack.json` (summary),
    both or neither. Returns the path of `stack.pt`.
    """
    from quasid.core.io import write_text_atomic
    from quasid.data.dataset import load_dataset

    ds = load_dataset(data_dir)
    sid_table = read_parquet(sids_path, SID_TABLE)
    cfg = stack_config(overrides)
    valid = None
    if ds.cutoff_ts is None:  # leave-one-out: each user's second-to-last item is held out

        valid = validation_requests(ds.interactions, cfg.retriever.max_history)
    stack, summary = train_stack(ds.items, sid_table, training_interactions(ds), cfg,
                                 device=device, seed=seed, valid=valid, progress=progress,
                                 source=str(sids_path))
    summary["data"] = str(data_dir)
    summary["sids"] = str(sids_path)
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        stack.save(tmp / STACK_FILE)
        write_text_atomic(json.dumps(summary, indent=2, sort_keys=True) + "\n", tmp / SUMMARY_FILE)
    return out_dir / STACK_FILE

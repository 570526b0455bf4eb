"""Learning curves of the generative retriever on the validation split, several configs at once.

Each config (a dict of `RetrieverConfig` overrides) trains in its own process on the
leave-one-out training part (cold items dropped); every `--eval-every` epochs the beam
search (beam 20) runs on a fixed sample of validation requests (each user's second-to-last
item) and HR@10 / NDCG@10 and the elapsed time are logged. Used to pick the schedule the
offline benchmark runs with, on validation data only. Then the constrained beam search's
throughput (beam 20, top-10) is measured with the first config's architecture (speed does
not depend on the weights), on the device and on the CPU.

    python benchmarks/retriever_curves.py --data DIR --sids SIDS.parquet --out DIR \
        --configs '[{"epochs": 20}, {"epochs": 40, "lr": 0.001}]' --device cuda --jobs 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _curve(data: str, sids: str, overrides: dict, device: str, eval_every: int, n_valid: int,
           seed: int, threads: int) -> dict:
    import polars as pl
    import torch

    from quasid.core.schemas import SID_TABLE, read_parquet
    from quasid.data.dataset import load_dataset
    from quasid.data.sequences import (
        row_mapper,
        training_windows,
        validation_requests,
    )
    from quasid.data.splits import leave_one_out
    from quasid.stack.config import stack_config
    from quasid.stack.metrics import hit_ndcg
    from quasid.stack.retriever import Retriever, train_retriever
    from quasid.stack.training import autocast
    from quasid.stack.trie import SidTrie, full_codes

    torch.set_num_threads(threads)
    ds = load_dataset(data)
    item_ids, codes = full_codes(read_parquet(sids, SID_TABLE), sids)
    rows_of = row_mapper(item_ids, data)
    cfg = stack_config({"retriever": overrides}).retriever
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    train = leave_one_out(ds.interactions, cold_items=cold).train
    hist, tgt = training_windows(train, rows_of, cfg.max_history)
    v_hist, v_tgt = validation_requests(ds.interactions, cfg.max_history)
    pick = np.random.default_rng(0).permutation(len(v_tgt))[:n_valid]
    v_hist = torch.as_tensor(rows_of(v_hist[pick]), device=device)
    v_tgt = rows_of(v_tgt[pick])
    torch.manual_seed(seed)
    model = Retriever(SidTrie.from_codes(codes), cfg).to(device)
    points, start = [], time.perf_counter()

    def on_epoch(epoch: int, loss: float) -> None:
        if (epoch + 1) % eval_every and epoch + 1 != cfg.epochs:
            return
        model.eval()
        ranked = []
        for s in range(0, len(v_hist), 1024):
            with autocast(device):
                ranked.append(model.beam_search(v_hist[s:s + 1024], 20)[0][:, :10].cpu().numpy())
        model.train()
        m = hit_ndcg(np.concatenate(ranked), v_tgt)
        points.append({"epoch": epoch + 1, "loss": round(loss, 4), "hr@10": float(m["hr@10"].mean()),
                       "ndcg@10": float(m["ndcg@10"].mean()),
                       "elapsed_s": round(time.perf_counter() - start, 1)})
        print(json.dumps({"config": overrides, **points[-1]}), flush=True)

    train_retriever(model, hist, tgt, seed=seed, progress=on_epoch)
    return {"config": overrides, "windows": len(tgt), "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--sids", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default="[{}]", help="JSON list of RetrieverConfig overrides")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--valid-users", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput-requests", type=int, default=16384)
    args = parser.parse_args()
    configs = json.loads(args.configs)
    throughput = _throughput(args, configs[0])  # first, on an idle machine
    print(json.dumps(throughput), flush=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_curve, args.data, args.sids, c, args.device, args.eval_every,
                               args.valid_users, args.seed, threads) for c in configs]
        curves = []
        for f in futures:
            try:
                curves.append(f.result())
            except Exception as exc:  # report and go on: the other configs still count
                curves.append({"error": f"{type(exc).__name__}: {exc}"})
    out = {"curves": curves, "throughput": throughput}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "curves.json").write_text(json.dumps(out, indent=2) + "\n")


def _throughput(args, overrides: dict) -> dict:
    import torch

    from quasid.core.schemas import SID_TABLE, read_parquet
    from quasid.stack.config import stack_config
    from quasid.stack.retriever import Retriever, beam_throughput
    from quasid.stack.trie import SidTrie, full_codes

    torch.set_num_threads(os.cpu_count() or 1)
    _, codes = full_codes(read_parquet(args.sids, SID_TABLE), args.sids)
    cfg = stack_config({"retriever": overrides}).retriever
    rng = np.random.default_rng(0)
    hist = rng.integers(0, len(codes), (args.throughput_requests, cfg.max_history))
    hist[:, : cfg.max_history // 2] = -1  # half-full histories, like the median user
    out = {}
    for device in dict.fromkeys([args.device, "cpu"]):
        torch.manual_seed(0)
        model = Retriever(SidTrie.from_codes(codes), cfg).to(device).eval()
        n = len(hist) if device != "cpu" else min(len(hist), 2048)
        out[device] = {"requests_per_s": round(beam_throughput(model, hist[:n], beam=20), 1),
                       "threads": torch.get_num_threads(), "requests": n}
    return out


if __name__ == "__main__":
    main()

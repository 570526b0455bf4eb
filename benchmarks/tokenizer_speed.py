"""Tokenizer speed: training-step time per tokenizer and batch size, SID assignment throughput.

Step time: the real training step (`quasid.tokenizer.fit.train_step` on a `BatchSampler` batch:
batch drawing and gathering, forward, losses, backward, AdamW, LR schedule), on random
content with random collaborative pairs, averaged over timed steps after warm-up; reported
with its overhead over `rqvae` at the same batch size.

SID assignment: encode + residual quantization + collision ranks of N items already on the
device, against the bandwidth floor = bytes of input read once (N × d × 4) / the device
bandwidth measured here (a large device-to-device copy, bytes read + written / time).

    python benchmarks/tokenizer_speed.py --device cuda --out benchmarks/results/speed.json
    python benchmarks/tokenizer_speed.py --device cpu --batches 256 1024 --assign 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from quasid.tokenizer.batches import BatchSampler
from quasid.tokenizer.fit import all_codes, build_optimizer, train_step
from quasid.tokenizer.pairs import PairIndex
from quasid.tokenizer.sids import collision_ranks
from quasid.tokenizer.tokenizer import make_tokenizer

TOKENIZERS = ("rqvae", "quasid", "rqvae+hamr", "uniform", "adasid", "adasid+hamr")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(name: str, content: torch.Tensor, pairs: np.ndarray, batch: int, steps: int,
              warmup: int, compile_: bool = False) -> float:
    """Mean seconds per training step of tokenizer `name` at batch size `batch`."""
    device = content.device
    tok = make_tokenizer(name, {"train": {"batch_size": batch, "compile": compile_}})
    model = tok._build(content.shape[1]).to(device)
    model.set_standardization(content)
    g = torch.Generator().manual_seed(0)
    sampler = BatchSampler(model.standardize(content), content,
                           PairIndex(pairs, content.shape[0], device), batch, g,
                           need_positive=tok.config.needs_pairs,
                           near_duplicate=tok.config.tau_dup if tok.config.hamr else None)
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(sampler.x[:65_536]).float(), g, 5)
    sampler.set_codes(all_codes(model, content))
    params, opt, sched = build_optimizer(model, tok.config.train, 10 ** 6, device)
    amp = device.type == "cuda"
    loss_fn = torch.compile(model.losses) if compile_ else model.losses
    model.train()
    sampler.new_epoch()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(device)
            start = time.perf_counter()
        train_step(loss_fn, sampler.batch(k % sampler.steps_per_epoch), 0.5, params, opt, sched,
                   1.0, amp)
    _sync(device)
    return (time.perf_counter() - start) / steps


def bandwidth(device: torch.device, nbytes: int = 2 ** 30) -> float:
    """Device memory bandwidth in bytes/s from a device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start)


def assign_time(n: int, dim: int, device: torch.device, amp: bool, chunk: int = 1 << 20
                ) -> dict:
    """Seconds to assign SIDs (codes + collision ranks) to n items of content on the device."""
    tok = make_tokenizer("quasid")
    model = tok._build(dim).to(device).eval()
    g = torch.Generator().manual_seed(0)
    content = torch.randn(n, dim, device=device)
    model.set_standardization(content[:100_000])
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(model.standardize(content[:65_536])), g, 5)
    ids = torch.arange(n, device=device)

    def run() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            codes = all_codes(model, content, chunk=chunk)
        return codes, collision_ranks(codes, ids)

    codes, _ = run()
    _sync(device)
    start = time.perf_counter()
    codes, _ = run()
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"items": n, "dim": dim, "amp_bf16": amp, "seconds": seconds, "items_per_s": n / seconds}
    if amp:  # how many items the bf16 encoder codes differently from fp32
        exact = all_codes(model, content, chunk=chunk)
        out["codes_equal_to_fp32"] = float((codes == exact).all(dim=1).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, default=20_000, help="catalog for step timing")
    parser.add_argument("--dim", type=int, default=64, help="content dimension")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd losses")
    parser.add_argument("--assign", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="catalog sizes for SID assignment throughput (0 = skip)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)", "dim": args.dim,
                    "items": args.items, "steps": {}, "assign": []}
    rng = np.random.default_rng(0)
    content = torch.tensor(rng.normal(size=(args.items, args.dim)), dtype=torch.float32,
                           device=device)
    pairs = rng.integers(0, args.items, size=(10 * args.items, 2))
    for variant in ([False, True] if args.compile else [False]):
        for batch in args.batches:
            row = {}
            for name in args.tokenizers:
                row[name] = step_time(name, content, pairs, batch, args.steps, args.warmup,
                                      compile_=variant)
            base = row.get("rqvae")
            key = f"{batch}{' compiled' if variant else ''}"
            result["steps"][key] = {n: {"ms": 1e3 * t,
                                        "overhead_vs_rqvae": (t / base - 1) if base else None}
                                    for n, t in row.items()}
            print(f"batch {key}: " + ", ".join(
                f"{n} {1e3 * t:.2f} ms" + (f" ({100 * (t / base - 1):+.0f}%)" if base else "")
                for n, t in row.items()), flush=True)
    sizes = [n for n in (args.assign or []) if n > 0]
    if sizes:
        bw = bandwidth(device)
        result["bandwidth_bytes_per_s"] = bw
        print(f"device bandwidth {bw / 1e12:.2f} TB/s (copy, read + write)", flush=True)
        for n in sizes:
            for amp in ([False, True] if device.type == "cuda" else [False]):
                row = assign_time(n, args.dim, device, amp)
                row["floor_seconds"] = n * args.dim * 4 / bw
                row["times_floor"] = row["seconds"] / row["floor_seconds"]
                result["assign"].append(row)
                print(f"assign {n:,} items ({'bf16' if amp else 'fp32'}): "
                      f"{row['seconds'] * 1e3:.1f} ms, {row['items_per_s'] / 1e6:.1f} M items/s, "
                      f"floor {row['floor_seconds'] * 1e3:.2f} ms ({row['times_floor']:.0f}x)"
                      + (f", codes equal to fp32 {row['codes_equal_to_fp32']:.4f}" if amp else ""),
                      flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

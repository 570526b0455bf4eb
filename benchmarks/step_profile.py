"""Where a tokenizer's training step spends its device time: kernel by kernel, per tokenizer.

Builds the same stepper as `tokenizer_speed.py` (random content and pairs, the real
`train_step` on `BatchSampler` batches), runs warm-up steps, then records `--steps` steps with
`torch.profiler` and sums each kernel's device time per step. The device time of a step is
what a CUDA graph replay cannot go below (a graph removes launches, not kernels), so the
difference of two tokenizers' totals is the part of their ratio that only fewer or cheaper
kernels can close. Prints the top kernels of each tokenizer and writes them as JSON.

    python benchmarks/step_profile.py --device cuda --batch 1024 --tokenizers rqvae quasid \
        --compile --out benchmarks/results/step_profile_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_speed import _sync, code_version, stepper  # noqa: E402

from quasid.core.io import write_text_atomic  # noqa: E402


def kernel_times(step, steps: int, device: torch.device) -> tuple[list[dict], float]:
    """([{name, calls, us}] per step, device-time order), total device µs per step) of
    `steps` calls of `step`, from the profiler's device-side kernel events."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows: dict[str, dict] = {}
    for event in prof.events():
        # device-side kernels only (the host-side op events would count their kernels twice);
        # a `record_function` range (e.g. "Optimizer.step#AdamW.step") also shows on the
        # device, as a user annotation spanning its kernels, and would count them twice too.
        # Matching device events against host names instead dropped every Triton kernel:
        # inductor's launcher records a host range named like the kernel it launches.
        if (event.device_type != torch.autograd.DeviceType.CUDA
                or getattr(event, "is_user_annotation", False)):
            continue
        row = rows.setdefault(event.name, {"name": event.name, "calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += event.time_range.elapsed_us()
    out = sorted(rows.values(), key=lambda r: -r["us"])
    for row in out:
        row["calls"] /= steps
        row["us"] /= steps
    return out, sum(r["us"] for r in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokenizers", nargs="+", default=["rqvae", "quasid"])
    parser.add_argument("--compile", action="store_true", help="torch.compile'd losses")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="kernels printed per tokenizer")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error(f"--device: the kernel times need CUDA, got {args.device!r}")
    if args.compile:  # every tokenizer's losses are one code object (see tokenizer_speed)
        torch._dynamo.config.recompile_limit = 64
    rng = np.random.default_rng(0)
    content = torch.tensor(rng.normal(size=(args.items, args.dim)), dtype=torch.float32,
                           device=device)
    pairs = rng.integers(0, args.items, size=(10 * args.items, 2))
    result = {"device": torch.cuda.get_device_name(device), "batch": args.batch,
              "compile": args.compile, "steps": args.steps, "code": code_version(),
              "tokenizers": {}}
    for name in args.tokenizers:
        step = stepper(name, content, pairs, args.batch, args.compile)
        for _ in range(args.warmup):
            step()
        kernels, total = kernel_times(step, args.steps, device)
        result["tokenizers"][name] = {"device_us_per_step": total,
                                      "kernels_per_step": sum(r["calls"] for r in kernels),
                                      "kernels": kernels}
        print(f"{name}: {total:.1f} µs of kernels per step, "
              f"{sum(r['calls'] for r in kernels):.0f} kernels", flush=True)
        for row in kernels[:args.top]:
            print(f"  {row['us']:8.1f} µs  {row['calls']:5.1f}x  {row['name'][:110]}", flush=True)
        del step
    if args.out:
        write_text_atomic(json.dumps(result, indent=2) + "\n", args.out)


if __name__ == "__main__":
    main()

"""Tokenizer speed: training-step time per tokenizer and batch size, SID assignment throughput.

Step time: the real training step (`quasid.tokenizer.fit.train_step` on a `BatchSampler` batch:
batch drawing and gathering, forward, losses, backward, AdamW, LR schedule), on random
content with random collaborative pairs, averaged over timed steps after warm-up (with
`--rounds`, blocks of steps timed in turn across the tokenizers, the median block); reported
with its overhead over `rqvae` at the same batch size, and its floor: the step's arithmetic
(`step_flops`) / the fp32 GEMM rate measured here on the same threads (`gemm_rate`).
`--pairs` picks the pair-term path (`SIDModel.sparse_pairs`: auto = sparse on the CPU, dense
B x B formulas elsewhere). `--compile` also times the step with `torch.compile`'d losses
(keys "B compiled"), `--graphs` the whole step as one CUDA graph (`fit.GraphedStep`, keys
"B graphed"; CUDA only), both together the compiled losses inside the graph (keys "B
compiled+graphed"), each row with its overhead over rqvae in the same row and over the
eager rqvae step; a tokenizer whose compile or capture fails is reported under `errors` and
the others are still timed. Each batch size also reports `batch_ms`: one
`BatchSampler.batch` call alone per tokenizer (the host's share of an eager step), and
`draw_ms`: one `BatchSampler.draw` (a graphed step's share: the graph assembles the batch).

SID assignment: encode + residual quantization + collision ranks of N items already on the
device, against the bandwidth floor = bytes of input read once (N × d × 4) / the device
bandwidth measured here (a large device-to-device copy, bytes read + written / time).

    python benchmarks/tokenizer_speed.py --device cuda --out benchmarks/results/speed.json
    python benchmarks/tokenizer_speed.py --device cpu --batches 256 1024 --assign 0 --threads 2
    python benchmarks/tokenizer_speed.py --device cuda --batches 1024 --tokenizers rqvae quasid \
        --compile --assign 0
    python benchmarks/tokenizer_speed.py --device cuda --batches 1024 --tokenizers rqvae quasid \
        rqvae+hamr uniform adasid --graphs --compile --steps 30 --rounds 3 --assign 0
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import time
import traceback
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

import quasid
from quasid.core.hashing import files_digest
from quasid.core.io import write_text_atomic
from quasid.tokenizer.batches import BatchSampler
from quasid.tokenizer.config import TokenizerConfig, tokenizer_config
from quasid.tokenizer.fit import all_codes, build_optimizer, train_step

try:
    from quasid.tokenizer.fit import GraphedStep
except ImportError:  # an older commit (PYTHONPATH at another worktree): no --graphs
    GraphedStep = None
from quasid.tokenizer.pairs import PairIndex
from quasid.tokenizer.sids import collision_ranks
from quasid.tokenizer.tokenizer import make_tokenizer

TOKENIZERS = ("rqvae", "quasid", "rqvae+hamr", "uniform", "adasid", "adasid+hamr")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PAIR_PATHS = {"auto": None, "sparse": True, "dense": False}


def step_flops(cfg: TokenizerConfig, batch: int) -> dict[str, float]:
    """FLOPs of one training step's arithmetic by part: what must be computed, however.

    network: encoder + decoder MLPs, 2 FLOPs per multiply-add forward and 4 backward (input
    and weight gradients); quantizer: the B x L x K code distances (forward only: argmin has
    no gradient); towers and infonce (contrastive): the two tower MLPs and the A x B logits
    (forward + backward), A = B / 4. The pair terms add nothing at this resolution: their
    nonzero pairs are the sparse candidate sets (a few per row), so the B² pairs cost no
    arithmetic; `dense_pairs` is what the dense B x B formulas compute on top (content cosine
    2d, latent distance 2·latent forward + 4·latent backward, ~20 elementwise per pair).
    """
    widths = [cfg.content_dim, *cfg.hidden, cfg.latent]
    macs = sum(a * b for a, b in pairwise(widths))
    parts = {"network": 6.0 * 2 * macs * batch,
             "quantizer": 2.0 * batch * cfg.levels * cfg.codebook_size * cfg.latent}
    if cfg.contrastive:
        tower = cfg.latent * cfg.tower_dim + cfg.tower_dim ** 2
        parts["towers"] = 6.0 * 2 * tower * batch
        parts["infonce"] = 6.0 * (batch // 4) * batch * cfg.tower_dim
    if cfg.hamr or cfg.uniform or cfg.adasid:
        cosine = 2 * cfg.content_dim if cfg.hamr or cfg.adasid else 0
        parts["dense_pairs"] = float(batch) ** 2 * (cosine + 6 * cfg.latent + 20)
    return parts


def gemm_rate(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """fp32 FLOP/s of an n x n x n matrix product on the device (the threads set)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def stepper(name: str, content: torch.Tensor, pairs: np.ndarray, batch: int,
            compile_: bool = False, pair_path: str = "auto", graphs: bool = False):
    """A function running one real training step of tokenizer `name` at batch size `batch`
    (model, sampler and optimizer built once, batches drawn in epoch order); with `graphs`
    the step is a `GraphedStep` (eager warm-up steps, then capture and replays)."""
    device = content.device
    tok = make_tokenizer(name, {"train": {"batch_size": batch, "compile": compile_}})
    model = tok._build(content.shape[1]).to(device)
    model.sparse_pairs = PAIR_PATHS[pair_path]
    model.set_standardization(content)
    g = torch.Generator().manual_seed(0)
    extra = {}
    if "near_duplicate" in inspect.signature(BatchSampler).parameters:  # older commits lack it
        extra["near_duplicate"] = tok.config.tau_dup if tok.config.hamr else None
    if "sparse" in inspect.signature(BatchSampler).parameters:  # the batches for that path
        extra["sparse"] = PAIR_PATHS[pair_path]
    sampler = BatchSampler(model.standardize(content), content,
                           PairIndex(pairs, content.shape[0], device), batch, g,
                           need_positive=tok.config.needs_pairs, **extra)
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(sampler.x[:65_536]).float(), g, 5)
    sampler.set_codes(all_codes(model, content))
    # capturable only when graphed (older commits' build_optimizer has no such argument)
    params, opt, sched = build_optimizer(model, tok.config.train, 10 ** 6, device,
                                         **({"capturable": True} if graphs else {}))
    amp = device.type == "cuda"
    loss_fn = torch.compile(model.losses) if compile_ else model.losses
    # a graph that assembles the batch from the sampler's draw (older commits' graph copies a
    # finished batch)
    drawn = graphs and "assemble" in inspect.signature(GraphedStep).parameters
    run = (GraphedStep(sampler.assemble) if drawn else GraphedStep()) if graphs else train_step
    next_batch = sampler.draw if drawn else sampler.batch
    model.train()
    sampler.new_epoch()
    done = [0]

    def step() -> None:
        run(loss_fn, next_batch(done[0] % sampler.steps_per_epoch), 0.5, params, opt, sched,
            1.0, amp)
        done[0] += 1

    step.sampler = sampler  # for `batch_times`
    return step


def _failure(name: str, key: str, exc: BaseException) -> str:
    """Print a tokenizer's failed build, compile or capture and return its one-line message."""
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    print(f"batch {key}: {name} FAILED ({message}); timing the others", flush=True)
    traceback.print_exc()
    return message


def step_times(steps_of: dict, steps: int, warmup: int, rounds: int, device: torch.device,
               errors: dict | None = None, key: str = "") -> dict[str, float]:
    """Median over `rounds` of the mean seconds per step of each stepper, the tokenizers timed
    in turn (a block of `steps` steps each, the order rotated every round), so load that
    drifts during the run falls on all of them alike.

    With `errors`, a stepper whose warm-up fails (a compile or a graph capture) is left out
    and its message put under errors[name]; without, the failure propagates.
    """
    for name, step in list(steps_of.items()):
        try:
            for _ in range(warmup):
                step()
            _sync(device)
        except Exception as exc:  # noqa: BLE001 (one tokenizer's failure must not lose the run)
            if errors is None:
                raise
            errors[name] = _failure(name, key, exc)
            del steps_of[name]
    names = list(steps_of)
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in steps_of:  # failed in an earlier round
                continue
            try:
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    steps_of[name]()
                _sync(device)
            except Exception as exc:  # noqa: BLE001
                if errors is None:
                    raise
                errors[name] = _failure(name, key, exc)
                del steps_of[name]
                continue
            per[name].append((time.perf_counter() - start) / steps)
    return {n: float(np.median(per[n])) for n in names if n in steps_of}


def batch_times(steps_of: dict, reps: int, device: torch.device, method: str = "batch"
                ) -> dict[str, float]:
    """Mean seconds of one `BatchSampler.batch` call per stepper (the host's share of an
    ungraphed step: row draws, pair look-ups, copies; on an accelerator until the device has
    the batch), or with `method="draw"` of one `BatchSampler.draw` (a graphed step's share)."""
    out = {}
    for name, step in steps_of.items():
        sampler = step.sampler
        call = getattr(sampler, method)
        _sync(device)
        start = time.perf_counter()
        for k in range(reps):
            call(k % sampler.steps_per_epoch)
        _sync(device)
        out[name] = (time.perf_counter() - start) / reps
    return out


def code_version() -> dict:
    """Where the measured `quasid` package lives, its git commit, whether its files differ
    from it (before/after runs point PYTHONPATH at another worktree), and a SHA-256 over its
    .py files: that names the code even where the git metadata does not (a copy of a working
    tree sent to another machine keeps whatever .git it was given)."""
    folder = Path(quasid.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=False,
                            capture_output=True, text=True).stdout.strip()
    # "." is the package folder itself (-C runs git there)
    dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "."],
                           check=False, capture_output=True, text=True).stdout.strip()
    sources = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
    return {"package": str(folder), "commit": commit, "dirty": bool(dirty),
            "source_sha256": files_digest(folder, sources)}


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


def _write(out: Path | None, result: dict) -> None:
    """The results JSON, rewritten after every row (atomically: never a half-written file)."""
    if out:
        write_text_atomic(json.dumps(result, indent=2) + "\n", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, default=20_000, help="catalog for step timing")
    parser.add_argument("--dim", type=int, default=64, help="content dimension")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=1,
                        help="blocks per tokenizer, in turn (the median block is reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd losses")
    parser.add_argument("--graphs", action="store_true",
                        help="also time the whole step as one CUDA graph (fit.GraphedStep; CUDA)")
    parser.add_argument("--assign", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="catalog sizes for SID assignment throughput (0 = skip)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--pairs", choices=sorted(PAIR_PATHS), default="auto",
                        help="pair-term path: sparse sets, dense B x B, auto (sparse on the CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # every tokenizer's `SIDModel.losses` is one code object: with the default limit of 8
        # compiled variants the later tokenizers would silently run eager
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
            else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)
    device = torch.device(args.device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)", "dim": args.dim,
                    "items": args.items, "pairs": args.pairs, "rounds": args.rounds,
                    "steps_per_round": args.steps, "steps": {}, "assign": []}
    rate = gemm_rate(device)
    result["gemm_flops_per_s"] = rate
    result["code"] = code_version()
    print(f"fp32 GEMM {rate / 1e9:.1f} GFLOP/s (the floors' rate)", flush=True)
    rng = np.random.default_rng(0)
    content = torch.tensor(rng.normal(size=(args.items, args.dim)), dtype=torch.float32,
                           device=device)
    pairs = rng.integers(0, args.items, size=(10 * args.items, 2))
    # (key suffix, compile, graphs); graphed before compiled: compiling takes the longest, so
    # a run cut short by a time limit still has the graphed row (the JSON is written per row)
    variants = [("", False, False)]
    if args.graphs:
        if device.type != "cuda" or GraphedStep is None:
            print("--graphs: skipped (needs CUDA and a package with fit.GraphedStep)", flush=True)
        else:
            variants.append((" graphed", False, True))
    if args.compile:
        variants.append((" compiled", True, False))
        if (" graphed", False, True) in variants:  # the compiled losses captured in the graph
            variants.append((" compiled+graphed", True, True))
    # graphed: the capture (after GraphedStep's 3 eager warm-up steps) falls in the warm-up
    warmup = max(args.warmup, 5) if args.graphs else args.warmup
    for suffix, compile_, graphs in variants:
        for batch in args.batches:
            key = f"{batch}{suffix}"
            errors: dict[str, str] = {}
            steps_of = {}
            for n in args.tokenizers:
                try:
                    steps_of[n] = stepper(n, content, pairs, batch, compile_, args.pairs, graphs)
                except Exception as exc:  # noqa: BLE001 (report it, time the others)
                    errors[n] = _failure(n, key, exc)
            row = step_times(steps_of, args.steps, warmup, args.rounds, device, errors, key)
            if not suffix:  # the batches are the same in every variant: timed once
                methods = ["batch"] + (["draw"] if hasattr(BatchSampler, "draw") else [])
                for method in methods:
                    host = batch_times(steps_of, args.steps * args.rounds, device, method)
                    result.setdefault(f"{method}_ms", {})[str(batch)] = {
                        n: 1e3 * t for n, t in host.items()}
                    print(f"batch {batch}: BatchSampler.{method} alone " + ", ".join(
                        f"{n} {1e3 * t:.3f} ms" for n, t in host.items()), flush=True)
            del steps_of  # frees the models, optimizers and graphs (their memory pools)
            flops = {n: step_flops(tokenizer_config(n).model_copy(
                update={"content_dim": args.dim}), batch) for n in row}
            base = row.get("rqvae")
            eager = result["steps"].get(str(batch), {}).get("rqvae", {}).get("ms")
            floors = {n: sum(v for k, v in f.items() if k != "dense_pairs") / rate
                      for n, f in flops.items()}
            result["steps"][key] = {n: {"ms": 1e3 * t,
                                        "overhead_vs_rqvae": (t / base - 1) if base else None,
                                        "overhead_vs_eager_rqvae":
                                            (1e3 * t / eager - 1) if eager else None,
                                        "floor_ms": 1e3 * floors[n], "flops": flops[n]}
                                    for n, t in row.items()}
            if errors:
                result.setdefault("errors", {})[key] = errors
            print(f"batch {key}: " + ", ".join(
                f"{n} {1e3 * t:.2f} ms" + (f" ({100 * (t / base - 1):+.0f}%)" if base else "")
                + (f" ({100 * (1e3 * t / eager - 1):+.0f}% vs eager rqvae)"
                   if suffix and eager else "")
                + f" [floor {1e3 * floors[n]:.2f}]" for n, t in row.items())
                + (f"; failed: {', '.join(errors)}" if errors else ""), flush=True)
            _write(args.out, result)  # after every row: a later crash keeps what was measured
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
    _write(args.out, result)


if __name__ == "__main__":
    main()

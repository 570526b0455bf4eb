"""The offline benchmark (issue 5) on one GPU: every dataset x tokenizer x seed in parallel processes.

Each run trains the tokenizer, then the stack (retriever + ranker) on the leave-one-out
training part, fits the final score's retrieval weight on the validation items and scores
the test items (`quasid.evaluation.offline.eval_run`). The small models leave one GPU mostly idle, so
`--jobs` runs share it; runs are ordered seed-major, so a deadline cuts seeds, not
tokenizers. At `--deadline` seconds unfinished runs are stopped and reported as failed;
the finished ones are aggregated per dataset (`quasid.evaluation.offline.offline_eval(reuse_only=True)`).
Then the serving speed of the first finished stack is measured: the retriever's constrained
beam search (beam 20, top-10) and the whole stack's `recommend`, on the device and the CPU,
over the dataset's real test histories.

    python benchmarks/offline_eval.py --data beauty=DIR --data toys=DIR \
        --tokenizers rqvae,rqkmeans,uniform,adasid,quasid,rqvae+hamr,adasid+hamr --seeds 3 \
        --out /tmp/bench --export $OUT --device cuda --jobs 21 --deadline 480

The tokenizer name `sasrec` adds the SASRec baseline (`quasid.stack.sasrec`), configured by
`--sasrec-overrides` (JSON, e.g. the `best_overrides.json` of benchmarks/tuning.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=DIR (repeatable)")
    parser.add_argument("--tokenizers", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", required=True, help="work folder (runs, stacks, results)")
    parser.add_argument("--export", default=None,
                        help="copy <name>.json, <name>.md, throughput.json here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--gpu-share", type=float, default=None,
                        help="each run's cap on the GPU's memory (default 0.95 / jobs; lower it "
                             "when other jobs share the GPU)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds before unfinished runs stop")
    parser.add_argument("--stack-preset", default="default",
                        help="stack preset of configs/stacks.yaml (e.g. tiger)")
    parser.add_argument("--overrides", default="", help="stack config overrides (JSON), over the preset")
    parser.add_argument("--tokenizer-epochs", type=int, default=None)
    parser.add_argument("--tokenizer-overrides", default="", help="tokenizer overrides (JSON)")
    parser.add_argument("--resume", action="append", default=[],
                        help="NAME=FILE: an exported <name>_runs.json of an earlier call; its "
                             "finished runs are restored and not run again (repeatable)")
    parser.add_argument("--progress", action="store_true", help="log every run's stack epochs")
    parser.add_argument("--sasrec-overrides", default="",
                        help="SasrecConfig overrides (JSON) of the `sasrec` runs")
    args = parser.parse_args()
    started = time.perf_counter()
    datasets = dict(d.split("=", 1) for d in args.data)
    tokenizers = [t for t in args.tokenizers.split(",") if t]
    from quasid.stack.config import stack_preset

    kwargs = dict(device=args.device, overrides=stack_preset(args.stack_preset, _as_json(args.overrides)),
                  tokenizer_epochs=args.tokenizer_epochs,
                  tokenizer_overrides=_as_json(args.tokenizer_overrides),
                  sasrec_overrides=_as_json(args.sasrec_overrides))
    out = Path(args.out)
    for spec in args.resume:
        name, path = spec.split("=", 1)
        _restore_runs(Path(path), out / name)
    tasks = [(name, tok, seed) for seed in range(args.seeds) for tok in tokenizers for name in datasets]
    _run_all(tasks, datasets, out, args, kwargs, started)

    from quasid.evaluation.offline import offline_eval

    export = Path(args.export) if args.export else None
    if export:
        export.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, data in datasets.items():
        try:
            res = offline_eval(data, tokenizers, args.seeds, out / name, reuse_only=True,
                               progress=False, **kwargs)
        except RuntimeError as exc:  # no run of this dataset finished
            print(f"{name}: {exc}", flush=True)
            continue
        summary[name] = res
        print((out / name / "results.md").read_text(), flush=True)
        if export:
            export.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / name / "results.json", export / f"{name}.json")
            shutil.copy(out / name / "results.md", export / f"{name}.md")
            _export_runs(out / name, export / f"{name}_runs.json")
    speed = _throughput(datasets, tokenizers, args, out)
    print(json.dumps(speed, indent=1), flush=True)
    if export:
        (export / "throughput.json").write_text(json.dumps(speed, indent=2) + "\n")
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)


def _as_json(text: str):
    """A JSON option's value (None when empty)."""
    return json.loads(text) if text else None


def _run_all(tasks, datasets, out, args, kwargs, started) -> None:
    """Run every task in a process pool; stop what is unfinished at the deadline."""
    from quasid.evaluation.offline import eval_run, run_parallel

    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    calls = {(name, tok, seed): ((datasets[name], tok, seed, out / name / "runs" / tok / f"seed{seed}"),
                                 dict(threads=threads, progress=args.progress, **kwargs))
             for name, tok, seed in tasks}

    def report(key, get) -> None:
        elapsed = time.perf_counter() - started
        try:
            m = get()
            print(f"[{elapsed:5.0f}s] {key}: stack ndcg@10 {m['stack']['all']['ndcg@10']:.4f} "
                  f"retrieval ndcg@10 {m['retrieval']['all']['ndcg@10']:.4f} "
                  f"timings {m['timings']} {m['summary']['timings']}", flush=True)
        except Exception as exc:  # reported; the aggregation lists it as failed
            print(f"[{elapsed:5.0f}s] {key}: FAILED {type(exc).__name__}: {exc}", flush=True)

    stopped = run_parallel(eval_run, calls, args.jobs, args.device, args.deadline, report, started,
                           args.gpu_share)
    if stopped:
        print(f"deadline: stopped {len(stopped)} unfinished runs: {stopped}", flush=True)


def _export_runs(run_root: Path, target: Path) -> None:
    """Every finished run's metrics in one file, so later runs can be merged seed by seed."""
    runs = {}
    for path in sorted(run_root.glob("runs/*/seed*/metrics.json")):
        m = json.loads(path.read_text())
        runs[f"{path.parent.parent.name}/{path.parent.name}"] = {
            k: m[k] for k in ("stack", "retrieval", "n", "settings", "timings", "summary") if k in m}
    target.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")


def _restore_runs(exported: Path, run_root: Path) -> None:
    """Write back the metrics.json of every run in an `_export_runs` file, so `eval_run` finds
    them finished (it reuses a run whose recorded settings match) and runs only the rest."""
    from quasid.core.io import write_text_atomic

    for key, metrics in json.loads(exported.read_text()).items():
        tok, seed = key.split("/")
        target = run_root / "runs" / tok / seed / "metrics.json"
        if not target.exists():
            write_text_atomic(json.dumps(metrics, indent=2, sort_keys=True) + "\n", target)


def _throughput(datasets, tokenizers, args, out) -> dict:
    """Serving speed of the first finished stack: beam search alone and the whole stack."""
    import torch

    from quasid.data.dataset import load_dataset
    from quasid.data.sequences import loo_requests
    from quasid.stack.retriever import beam_throughput
    from quasid.stack.serving import Stack

    for name, data in datasets.items():
        for tok in tokenizers:
            path = out / name / "runs" / tok / "seed0" / "stack.pt"
            if path.exists():
                break
        if path.exists():
            break
    else:
        return {}
    if args.export:
        shutil.copy(path, Path(args.export) / f"stack_{name}_{tok}_seed0.pt")
    hist, _ = loo_requests(load_dataset(data).interactions, 20)
    result = {"stack": str(path), "requests": int(len(hist)), "beam": 20, "k": 10}
    torch.set_num_threads(os.cpu_count() or 1)
    for device in dict.fromkeys([args.device, "cpu"]):
        stack = Stack.load(path, device=device)
        n = len(hist) if device != "cpu" else min(len(hist), 1024)
        beam_rps = beam_throughput(stack.retriever, stack.rows_of(hist[:n]), beam=20,
                                   repeats=3 if device != "cpu" else 1)
        stack.recommend(hist[:1024], 10)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stack.recommend(hist[:n], 10)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result[device] = {"beam_search_requests_per_s": round(beam_rps, 1),
                          "stack_requests_per_s": round(n / (time.perf_counter() - t0), 1),
                          "requests": n, "threads": torch.get_num_threads(),
                          "name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    return result


if __name__ == "__main__":
    main()

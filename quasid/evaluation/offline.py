"""Offline evaluation: leave-one-out HR@K and NDCG@K over the full item set (the TIGER protocol).

Per user, the last interaction is the test target and everything before it (at most the
model's history length) the request. Cold items' interactions are dropped from training
only (`leave_one_out(cold_items=...)`), so a cold item can be a test target; the `cold`
segment is the requests whose target is a cold item. Both the full stack's slates
(retriever -> ranker) and the retriever's beam alone (ordered by log p, as TIGER reports)
are scored. With one relevant item per request, HR@K = [rank < K] and
NDCG@K = [rank < K] / log2(rank + 2) (rank 0-based).

`offline_eval` runs tokenizers x seeds: train the tokenizer (`quasid.tokenizer.train.train_tokenizer`),
train a stack on the leave-one-out training part, evaluate, and aggregate mean and standard
deviation over seeds into `results.json` and `results.md`. Each run's metrics are cached in
`out/runs/<tokenizer>/seed<k>/metrics.json` (reused when the settings match), and runs can
go in parallel processes sharing one GPU (`jobs`).

The tokenizer name "sasrec" runs the ID-based SASRec baseline instead (`quasid.stack.sasrec`:
no tokenizer, no stack; its settings are `sasrec_overrides`), trained on the same training
part, early-stopped on the same validation requests and scored by the same code; being one
model, its slates fill both the stack and the retrieval entries. The name
"sasrec+transitions" is that SASRec with the stack's transition counts blended into its
score (`SasrecConfig.transitions`: the stack config's `transitions` settings, its weight
fitted on the same validation requests), the fair opponent of a stack that uses them. The
name "transition" runs the model-free first-order transition baseline
(`quasid.stack.transitions`: the last items' most frequent followers in the same training
part, then popularity) the same way: the floor of the tables; it is deterministic, so its
seeds repeat one figure (std 0).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.config import ConfigError
from quasid.core.io import staged_dir, write_text_atomic
from quasid.core.layout import RUN_METRICS_FILE, SASREC_FILE, TOKENIZER_SETTINGS_FILE
from quasid.core.schemas import SID_TABLE, read_parquet
from quasid.data.sequences import drop_last, loo_requests, validation_requests
from quasid.stack.metrics import KS, hit_ndcg

METRICS = tuple(f"{m}@{k}" for m in ("hr", "ndcg") for k in KS)
SEGMENTS = ("all", "cold")
SASREC = "sasrec"
"""The tokenizer name that runs the SASRec baseline (`quasid.stack.sasrec.NAME`)."""
SASREC_TRANSITIONS = "sasrec+transitions"
"""The tokenizer name of SASRec with transition counts (`quasid.stack.sasrec.TRANSITIONS_NAME`)."""
SASRECS = (SASREC, SASREC_TRANSITIONS)
TRANSITION = "transition"
"""The tokenizer name that runs the transition baseline (`quasid.stack.transitions.NAME`)."""
TRANSITION_HISTORY = 50
"""History length of the transition baseline's requests (its slates leave these items out)."""


def evaluate_stack(stack, items: pl.DataFrame, interactions: pl.DataFrame, split: str = "test"
                   ) -> dict:
    """Leave-one-out metrics of a `quasid.stack.serving.Stack`: {stage: {segment: {metric:
    mean}}, "n": {...}}.

    split="test" scores each user's last item; "valid" the second-to-last (for tuning).
    """
    max_len = max(stack.cfg.retriever.max_history, stack.cfg.ranker.max_history)
    hist, targets, cold = _requests(items, interactions, split, max_len)
    k = max(KS)
    slate, _, beam = stack.slates(hist, k)
    return _metrics({"stack": slate, "retrieval": beam[:, :k]}, targets, cold)


def evaluate_recommender(model, items: pl.DataFrame, interactions: pl.DataFrame,
                         max_history: int, split: str = "test") -> dict:
    """`evaluate_stack`'s metrics of any `quasid.core.recommender.Recommender` that is one
    model (SASRec): its top-K fills both the "stack" and the "retrieval" entries;
    `cold_slot_share` is the share of its top-K slots holding cold items."""
    hist, targets, cold = _requests(items, interactions, split, max_history)
    slate, _ = model.recommend(hist, max(KS))
    out = _metrics({"stack": slate, "retrieval": slate}, targets, cold)
    cold_ids = items.filter(pl.col("is_cold"))["item_id"].to_numpy()
    out["cold_slot_share"] = float(np.isin(slate, cold_ids).mean()) if len(slate) else float("nan")
    return out


def _requests(items: pl.DataFrame, interactions: pl.DataFrame, split: str, max_len: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(histories, targets, target is cold) of the leave-one-out requests of `split`."""
    if split not in ("test", "valid"):
        raise ValueError(f"split={split!r}: expected 'test' or 'valid'")
    if split == "valid":
        interactions = drop_last(interactions)
    hist, targets = loo_requests(interactions, max_len)
    cold_ids = items.filter(pl.col("is_cold"))["item_id"].to_numpy()
    return hist, targets, np.isin(targets, cold_ids)


def _metrics(ranked: dict[str, np.ndarray], targets: np.ndarray, cold: np.ndarray) -> dict:
    """{stage: {segment: {metric: mean}}, "n": {segment: requests}} of each stage's slates."""
    out: dict = {"n": {"all": int(len(targets)), "cold": int(cold.sum())}}
    for stage, slate in ranked.items():
        per = hit_ndcg(slate, targets)
        out[stage] = {seg: {m: float(v[mask].mean()) if mask.any() else float("nan")
                            for m, v in per.items()}
                      for seg, mask in (("all", np.ones_like(cold)), ("cold", cold))}
    return out


def limit_gpu_memory(share: float | None) -> None:
    """Process-pool initializer of parallel runs on one GPU: cap this process's CUDA allocator
    at `share` of the device memory (None: no cap, e.g. on the CPU)."""
    if share is not None:
        import torch

        torch.cuda.set_per_process_memory_fraction(share)


def run_parallel(fn, calls: dict, jobs: int, device: str, deadline: float | None = None,
                 report=None, started: float | None = None, gpu_share: float | None = None
                 ) -> list:
    """Run `fn(*args, **kwargs)` (e.g. `eval_run`) for every `key: (args, kwargs)` of `calls`,
    `jobs` at once in spawned processes (one task each, every process capped at its share of
    the GPU's memory on CUDA); returns the keys still unfinished at `deadline` seconds after `started`
    (`time.perf_counter()`, default now), which are then stopped.

    `report(key, get)` runs in this process as each call finishes: `get()` returns the call's
    result or raises its error (a failed call never stops the others). `gpu_share`: each
    process's cap (default 0.95 / jobs; lower when other jobs share the GPU).
    """
    import multiprocessing as mp

    started = time.perf_counter() if started is None else started
    jobs = max(1, jobs)
    # without a cap the caching allocators of 21 runs kept ~7 GiB each and the last
    # evaluations ran out of memory (Toys, 21 jobs)
    share = (gpu_share or 0.95 / jobs) if str(device).startswith("cuda") else None
    pool = mp.get_context("spawn").Pool(jobs, maxtasksperchild=1,
                                        initializer=limit_gpu_memory, initargs=(share,))
    pending = {key: pool.apply_async(fn, args, kwargs)
               for key, (args, kwargs) in calls.items()}
    pool.close()
    while pending:
        for key in [k for k, r in pending.items() if r.ready()]:
            result = pending.pop(key)
            if report is not None:
                report(key, result.get)
        if deadline and time.perf_counter() - started > deadline and pending:
            pool.terminate()
            break
        time.sleep(0.5)
    pool.join()
    return sorted(pending)


def eval_run(data_dir: str | Path, tokenizer: str, seed: int, run_dir: str | Path, *,
             device: str = "cpu", overrides: dict | None = None, tokenizer_epochs: int | None = None,
             tokenizer_overrides: dict | None = None, split: str = "test",
             save_stack: bool = True, threads: int | None = None, reuse_only: bool = False,
             progress: bool = False, sasrec_overrides: dict | None = None) -> dict:
    """One tokenizer x seed: SIDs, stack, metrics; writes and returns `run_dir/metrics.json`'s content.

    Reuses the metrics if the settings match, and `run_dir/tokenizer/sids.parquet` if this
    function trained it with the same tokenizer settings (recorded beside it) or it was put
    there by hand (no record: used as is). `reuse_only`: never train; a run without matching
    metrics raises `FileNotFoundError`. `progress`: log the stack's epochs to stderr.
    Tokenizer "sasrec": the SASRec baseline with `sasrec_overrides`
    (`quasid.stack.sasrec.SasrecConfig` fields; the stack and tokenizer settings do not apply
    and are not recorded), saved as `run_dir/sasrec.pt`. "sasrec+transitions": the same with
    the `transitions` settings of the stack config `overrides` (recorded) as its
    `SasrecConfig.transitions`.
    """
    import torch

    from quasid.data.dataset import load_dataset
    from quasid.data.splits import leave_one_out
    from quasid.stack.build import train_stack
    from quasid.stack.config import stack_config

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    settings = {"data": str(data_dir), "tokenizer": tokenizer, "seed": seed,
                **(sasrec_settings(sasrec_overrides, split, tokenizer, overrides)
                   if tokenizer in SASRECS else
                   {"split": split} if tokenizer == TRANSITION else
                   eval_settings(overrides, tokenizer_epochs, tokenizer_overrides, split))}
    metrics_path = run_dir / RUN_METRICS_FILE
    if metrics_path.exists():
        cached = json.loads(metrics_path.read_text())
        if cached.get("settings") == settings:
            return cached
    if reuse_only:
        raise FileNotFoundError(f"{metrics_path}: no finished run with these settings")
    if tokenizer in SASRECS:
        return _sasrec_run(data_dir, seed, run_dir, settings, device=device, save_model=save_stack,
                           progress=progress)
    if tokenizer == TRANSITION:
        return _transition_run(data_dir, run_dir, settings)
    started = time.perf_counter()
    tok_dir = run_dir / "tokenizer"
    sids_path = tok_dir / "sids.parquet"
    tok_settings = {k: settings[k] for k in ("data", "tokenizer", "seed", "tokenizer_epochs",
                                             "tokenizer_overrides")}
    record = tok_dir / TOKENIZER_SETTINGS_FILE
    tokenizer_s = 0.0
    if not sids_path.exists() or (record.exists()
                                  and json.loads(record.read_text()) != tok_settings):
        from quasid.tokenizer.train import train_tokenizer

        train_tokenizer(Path(data_dir), tokenizer, tok_dir, device=device,
                        epochs=tokenizer_epochs, seed=seed, overrides=tokenizer_overrides)
        write_text_atomic(json.dumps(tok_settings, indent=2, sort_keys=True) + "\n", record)
        tokenizer_s = time.perf_counter() - started
    sid_table = read_parquet(sids_path, SID_TABLE)
    ds = load_dataset(data_dir)
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    train = leave_one_out(ds.interactions, cold_items=cold).train
    cfg = stack_config(overrides)
    # the blend weight (and early stopping, when set) use the validation requests; when tuning
    # (split="valid") the score is then on the same requests, equally optimistic for everyone
    valid = validation_requests(ds.interactions, cfg.retriever.max_history)
    stack, summary = train_stack(ds.items, sid_table, train, cfg, device=device, seed=seed,
                                 valid=valid, source=str(sids_path), progress=progress)
    t0 = time.perf_counter()
    result = evaluate_stack(stack, ds.items, ds.interactions, split)
    result.update(settings=settings, summary=summary,
                  timings={"tokenizer_s": round(tokenizer_s, 1),
                           "eval_s": round(time.perf_counter() - t0, 1),
                           "total_s": round(time.perf_counter() - started, 1)})
    if save_stack:
        stack.save(run_dir / "stack.pt")
    write_text_atomic(json.dumps(result, indent=2, sort_keys=True) + "\n", metrics_path)
    return result


def _sasrec_run(data_dir: str | Path, seed: int, run_dir: Path, settings: dict, *,
                device: str, save_model: bool, progress: bool = False) -> dict:
    """`eval_run` for the SASRec baseline: the same training part, validation requests and
    scoring as a stack run; writes and returns `run_dir/metrics.json`'s content."""
    from quasid.stack.sasrec import sasrec_config, train_sasrec

    cfg = sasrec_config({**settings["sasrec_overrides"],
                         "transitions": settings.get("transitions")})

    def fit(ds, train: pl.DataFrame):
        valid = validation_requests(ds.interactions, cfg.max_history)
        return train_sasrec(ds.items, train, cfg, device=device, seed=seed, valid=valid,
                            progress=progress)

    save = (lambda model: model.save(run_dir / SASREC_FILE)) if save_model else None
    return _one_model_run(data_dir, run_dir, settings, fit, cfg.max_history, save)


def _transition_run(data_dir: str | Path, run_dir: Path, settings: dict) -> dict:
    """`eval_run` for the transition baseline: counted on the same training part, scored by
    the same code (no validation needed: nothing to select)."""
    from quasid.stack.transitions import TransitionRecommender

    def fit(ds, train: pl.DataFrame):
        started = time.perf_counter()
        model = TransitionRecommender.fit(train)
        return model, {"successors": model.followers.shape[1], "backoff": model.backoff,
                       "sources": int(len(model.sources)),
                       "timings": {"fit_s": round(time.perf_counter() - started, 2)}}

    return _one_model_run(data_dir, run_dir, settings, fit, TRANSITION_HISTORY)


def _one_model_run(data_dir: str | Path, run_dir: Path, settings: dict, fit, max_history: int,
                   save=None) -> dict:
    """A baseline that is one model: `fit(dataset, train)` -> (model, summary) on the
    leave-one-out training part (cold items dropped), then `evaluate_recommender`; writes
    and returns `run_dir/metrics.json`'s content (`save(model)` first, when given)."""
    from quasid.data.dataset import load_dataset
    from quasid.data.splits import leave_one_out

    started = time.perf_counter()
    ds = load_dataset(data_dir)
    cold = ds.items.filter(pl.col("is_cold"))["item_id"]
    train = leave_one_out(ds.interactions, cold_items=cold).train
    model, summary = fit(ds, train)
    t0 = time.perf_counter()
    result = evaluate_recommender(model, ds.items, ds.interactions, max_history,
                                  settings["split"])
    result.update(settings=settings, summary=summary,
                  timings={"tokenizer_s": 0.0, "eval_s": round(time.perf_counter() - t0, 1),
                           "total_s": round(time.perf_counter() - started, 1)})
    if save is not None:
        save(model)
    write_text_atomic(json.dumps(result, indent=2, sort_keys=True) + "\n",
                      run_dir / RUN_METRICS_FILE)
    return result


def aggregate(runs: list[dict], stage: str = "stack") -> list[dict]:
    """Rows (one per tokenizer x segment) of mean and sample std over seeds of one stage's metrics."""
    rows = []
    tokenizers = list(dict.fromkeys(r["settings"]["tokenizer"] for r in runs))
    for tok in tokenizers:
        mine = [r for r in runs if r["settings"]["tokenizer"] == tok]
        for seg in SEGMENTS:
            row = {"tokenizer": tok, "segment": seg}
            for m in METRICS:
                values = np.array([r[stage][seg][m] for r in mine], dtype=np.float64)
                row[m] = float(np.mean(values))
                row[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row["seeds"] = len(mine)
            row["requests"] = int(mine[0]["n"][seg])
            rows.append(row)
    return rows


def welch_tests(runs: list[dict], reference: str = "quasid") -> list[dict]:
    """Welch t-tests over seeds of `reference` against every other tokenizer: one row per
    stage x segment x metric (@10) x baseline with both means, the relative difference and
    the two-sided p (NaN with fewer than two seeds a side or no spread). Empty when the
    reference did not run."""
    from scipy import stats

    by_tok: dict[str, list[dict]] = {}
    for r in runs:
        by_tok.setdefault(r["settings"]["tokenizer"], []).append(r)
    if reference not in by_tok:
        return []
    rows = []
    for stage in ("stack", "retrieval"):
        for seg in SEGMENTS:
            for m in ("hr@10", "ndcg@10"):
                ref = np.array([r[stage][seg][m] for r in by_tok[reference]])
                for tok, mine in by_tok.items():
                    if tok == reference:
                        continue
                    base = np.array([r[stage][seg][m] for r in mine])
                    testable = len(ref) > 1 and len(base) > 1 and (ref.std() > 0 or base.std() > 0)
                    p = (float(stats.ttest_ind(ref, base, equal_var=False).pvalue) if testable
                         else float("nan"))
                    rows.append({"stage": stage, "segment": seg, "metric": m,
                                 "tokenizer": reference, "baseline": tok,
                                 "mean": float(ref.mean()), "baseline_mean": float(base.mean()),
                                 "relative": (float(ref.mean() / base.mean() - 1) if base.mean()
                                              else float("nan")),
                                 "p": p, "seeds": [len(ref), len(base)]})
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    """A Markdown table of `aggregate` rows, metrics as mean ± std."""
    head = "| tokenizer | segment | " + " | ".join(METRICS) + " | seeds | requests |"
    lines = [f"### {title}", "", head, "|" + " --- |" * (len(METRICS) + 4)]
    for r in rows:
        cells = " | ".join(f"{r[m]:.4f} ± {r[m + '_std']:.4f}" for m in METRICS)
        lines.append(f"| {r['tokenizer']} | {r['segment']} | {cells} | {r['seeds']} "
                     f"| {r['requests']} |")
    return "\n".join(lines) + "\n"


def run_folder(out_dir: str | Path, tokenizer: str, seed: int) -> Path:
    """Where one tokenizer x seed run of an offline evaluation keeps its outputs."""
    return Path(out_dir) / "runs" / tokenizer / f"seed{seed}"


def offline_eval(
    data_dir: str | Path,
    tokenizers: list[str],
    seeds: int,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    jobs: int = 1,
    overrides: dict | None = None,
    tokenizer_epochs: int | None = None,
    tokenizer_overrides: dict | None = None,
    split: str = "test",
    reuse_only: bool = False,
    progress: bool = True,
    sasrec_overrides: dict | None = None,
) -> dict:
    """Evaluate each tokenizer over `seeds` seeds (0..seeds-1); write `results.json` and `results.md`.

    `results.json` = {"rows": [...]} (the full stack: retriever -> ranker), one row per
    tokenizer x segment (`all`, `cold`) with the means over seeds of hr@5, hr@10, ndcg@5,
    ndcg@10 and their sample standard deviations (`_std`), plus `retrieval_rows` (the
    retriever's beam alone, TIGER's protocol), `failed` runs and the settings. `jobs` > 1
    runs that many tokenizer x seed runs at once in separate processes (on one GPU, the
    small models then keep it busy). A failed run is reported, not fatal, unless all fail.
    `reuse_only`: aggregate the finished runs only (runs missing are reported as failed).
    The tokenizer "sasrec" is the SASRec baseline, configured by `sasrec_overrides`.
    """
    out_dir = Path(out_dir)
    tasks = eval_tasks(tokenizers, seeds)
    kwargs = dict(device=device, overrides=overrides, tokenizer_epochs=tokenizer_epochs,
                  tokenizer_overrides=tokenizer_overrides, split=split, reuse_only=reuse_only,
                  sasrec_overrides=sasrec_overrides)
    done: dict[tuple[str, int], dict] = {}
    failed: dict[str, str] = {}
    log = _logger(progress)
    started = time.perf_counter()
    def record(key: tuple[str, int], get) -> None:
        tok, s = key
        try:
            done[key] = get()
            log(f"{tok} seed {s}: {_brief(done[key])} [{time.perf_counter() - started:.0f}s]")
        except Exception as exc:  # one broken tokenizer must not sink the whole benchmark
            failed[f"{tok}/seed{s}"] = f"{type(exc).__name__}: {exc}"
            log(f"{tok} seed {s} FAILED: {failed[f'{tok}/seed{s}']}\n{traceback.format_exc()}")

    if jobs <= 1:
        for tok, s in tasks:
            record((tok, s), partial(eval_run, data_dir, tok, s, run_folder(out_dir, tok, s),
                                     **kwargs))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        calls = {(tok, s): ((str(data_dir), tok, s, run_folder(out_dir, tok, s)),
                            {"threads": threads, **kwargs}) for tok, s in tasks}
        run_parallel(eval_run, calls, jobs, device, report=record, started=started)
    settings = eval_settings(overrides, tokenizer_epochs, tokenizer_overrides, split)
    if any(tok in SASRECS for tok in tokenizers):
        settings["sasrec_overrides"] = sasrec_overrides or {}
    return write_results(out_dir, data_dir, tasks, done, failed, seeds, device, settings)


def eval_tasks(tokenizers: list[str], seeds: int) -> list[tuple[str, int]]:
    """The (tokenizer, seed) runs of an offline evaluation: each tokenizer once, seeds 0..seeds-1."""
    if not tokenizers or seeds < 1:
        raise ValueError(f"offline_eval: tokenizers={tokenizers}, seeds={seeds}: expected at "
                         "least one of each")
    return [(tok, s) for tok in dict.fromkeys(tokenizers) for s in range(seeds)]


def eval_settings(overrides: dict | None, tokenizer_epochs: int | None,
                  tokenizer_overrides: dict | None, split: str = "test") -> dict:
    """The settings an offline evaluation records in `results.json` (None overrides as {})."""
    return {"overrides": overrides or {}, "tokenizer_epochs": tokenizer_epochs,
            "tokenizer_overrides": tokenizer_overrides or {}, "split": split}


def sasrec_settings(sasrec_overrides: dict | None, split: str = "test", tokenizer: str = SASREC,
                    overrides: dict | None = None) -> dict:
    """The settings a SASRec run records (None overrides as {}); "sasrec+transitions" adds
    the full `transitions` settings of the stack config `overrides`."""
    if "transitions" in (sasrec_overrides or {}):
        raise ConfigError("sasrec_overrides.transitions: not a SASRec override (the tokenizer "
                          f"name {SASREC_TRANSITIONS!r} takes the stack overrides' transitions)")
    settings = {"sasrec_overrides": sasrec_overrides or {}, "split": split}
    if tokenizer == SASREC_TRANSITIONS:
        from quasid.stack.config import stack_config

        settings["transitions"] = stack_config(overrides).transitions.model_dump(mode="json")
    return settings


def write_results(out_dir: str | Path, data_dir: str | Path, tasks: list[tuple[str, int]],
                  done: dict[tuple[str, int], dict], failed: dict[str, str], seeds: int,
                  device: str, settings: dict) -> dict:
    """Aggregate the finished runs (`done[tokenizer, seed]` = a run's metrics) and write
    `results.json` and `results.md` to `out_dir` together; returns the results.

    `failed` maps "tokenizer/seedN" to its error; all runs failed is an error.
    """
    out_dir = Path(out_dir)
    runs = [done[t] for t in tasks if t in done]
    if not runs:
        raise RuntimeError(f"offline_eval: every run failed: {failed}")
    results = {
        "rows": aggregate(runs, "stack"),
        "retrieval_rows": aggregate(runs, "retrieval"),
        "welch": welch_tests(runs),
        "failed": failed,
        "data": str(data_dir),
        "device": device,
        "seeds": seeds,
        "settings": settings,
        "timings": {f"{t}/seed{s}": done[t, s]["timings"] for t, s in tasks if (t, s) in done},
    }
    with staged_dir(out_dir) as tmp:
        write_text_atomic(json.dumps(results, indent=2) + "\n", tmp / "results.json")
        write_text_atomic(results_markdown(results), tmp / "results.md")
    return results


def _ratio(relative: float) -> str:
    """A relative difference for the tables; n/a where the baseline's mean is 0."""
    return "n/a" if math.isnan(relative) else f"{relative:+.1%}"


def _p_value(p: float) -> str:
    """A p-value for the tables; n/a where both groups are constant (no variance to test)."""
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def results_markdown(results: dict) -> str:
    """`results.md`: the stack and the retriever-alone tables, and the failed runs."""
    md = (f"# Offline evaluation: {results['data']}\n\nLeave-one-out over the full item set, "
          f"mean ± sample std over seeds ({results['seeds']} requested).\n\n"
          + markdown_table(results["rows"], "Stack (retriever -> ranker)") + "\n"
          + markdown_table(results["retrieval_rows"], "Retriever beam alone (TIGER protocol)"))
    if results.get("welch"):
        md += ("\n### quasid against each baseline (Welch t-test over seeds, two-sided)\n\n"
               "| stage | segment | metric | baseline | quasid | baseline mean | relative | p | seeds |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
        md += "".join(f"| {w['stage']} | {w['segment']} | {w['metric']} | {w['baseline']} "
                      f"| {w['mean']:.4f} | {w['baseline_mean']:.4f} | {_ratio(w['relative'])} "
                      f"| {_p_value(w['p'])} | {w['seeds'][0]}, {w['seeds'][1]} |\n"
                      for w in results["welch"])
    if results["failed"]:
        md += "\nFailed runs:\n" + "".join(f"- {k}: {v}\n" for k, v in results["failed"].items())
    return md


def _brief(run: dict) -> str:
    s, r = run["stack"]["all"], run["retrieval"]["all"]
    return (f"stack hr@10 {s['hr@10']:.4f} ndcg@10 {s['ndcg@10']:.4f}; "
            f"retrieval hr@10 {r['hr@10']:.4f} ndcg@10 {r['ndcg@10']:.4f}")


def _logger(enabled: bool):
    if not enabled:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.log(msg)

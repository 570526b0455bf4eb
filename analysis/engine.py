"""The analysis engine: store → statistics → tests → results, as data (no report files).

`analyze_run` returns an `Analysis` (results and details) and writes nothing but the DuckDB
views file; `analysis.analyze.analyze` turns it into the report and the JSON files.

`results.json` = `{"rows": [...], "srm": {...}}`; each row has exactly the keys of
`ROW_KEYS`: one per metric × segment × treatment arm. `details.json` holds what does not fit
a row: CUPED variance reductions, power and minimum detectable effects, the sequential
(always-valid) looks by day, skipped cells and the run's settings.

Multiple testing is per family (`family_of`): the primary metrics × treatment arms on all
users are the confirmatory family; secondary and guardrail metrics are families of their
own; segments and days are exploratory families (adjusted within themselves, labelled
`exploratory`). Each row's CIs are at the level its family's adjusted decision implies
(`stats.decision_level`, `ci_level` in the row), so a CI excludes 0 exactly when the row is
significant after adjustment.

The sequential looks use a mixture variance τ² fixed once, from the planned horizon (the
manifest's `days`), at the first analysis of a run, and reused from the analysis state
(`analysis_state.json`, written beside the outputs) at every re-analysis.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from analysis import stats
from analysis.metrics import (
    REGISTRY,
    Cell,
    Metric,
    Statistics,
    bootstrap_replicates,
    collect,
    event_types_read,
    get_metrics,
    load_metrics_file,
)
from analysis.replicates import cell_statistics, replicate_counts, replicate_result
from analysis.store import AnalysisError, StoreInfo, _columns, build_store, connect
from quasid.core.config import ConfigError

ROW_KEYS = ("metric", "segment", "arm", "control_mean", "treatment_mean", "abs_effect",
            "rel_effect", "ci_low", "ci_high", "abs_ci_low", "abs_ci_high", "p_value",
            "p_adjusted", "n_control", "n_treatment", "method", "family", "exploratory",
            "ci_level", "warning", "replicates", "training_sd", "user_se", "per_replicate")
STATE_VERSION = 1


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of an analysis (the CLI's options)."""

    alpha: float = 0.05
    control: str | None = None
    correction: str = "bh"
    metrics: tuple[str, ...] | None = None
    bootstrap: int = 0
    power: float = 0.8
    target_uplift: float = 0.02
    seed: int = 0
    threads: int | None = 1
    metrics_file: str | None = None
    primary: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and int(self.threads) < 1:
            raise AnalysisError(f"threads {self.threads!r}: expected >= 1 (1: byte-identical "
                                f"results) or None (DuckDB's default)")
        if not 0.0 < self.alpha < 0.5:
            raise AnalysisError(f"alpha {self.alpha!r}: expected a number in (0, 0.5)")
        if not 0.0 < self.power < 1.0:
            raise AnalysisError(f"power {self.power!r}: expected a number in (0, 1)")
        if self.correction not in stats.CORRECTIONS:
            raise AnalysisError(f"correction {self.correction!r}: expected one of "
                                f"{sorted(stats.CORRECTIONS)}")
        if self.bootstrap < 0 or (0 < self.bootstrap < 100):
            raise AnalysisError(f"bootstrap {self.bootstrap!r}: expected 0 (off) or >= 100 "
                                f"replicates")
        if not self.target_uplift > 0:
            raise AnalysisError(f"target_uplift {self.target_uplift!r}: expected a relative "
                                f"effect > 0 (0.02 = 2%)")


@dataclass
class Analysis:
    """Everything one analysis produced: the results (rows, SRM) and the details."""

    results: dict
    details: dict
    timings: dict[str, float] = field(default_factory=dict)
    state: dict = field(default_factory=dict)


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _untestable(control: stats.Moments, treatment: stats.Moments, ratio: bool) -> str | None:
    """Why a cell cannot be tested (None when it can): too few units, zero variance, …"""
    for name, m in (("control", control), ("treatment", treatment)):
        if m.n < 2:
            return f"fewer than 2 units in {name}"
        if ratio and m.mean[1] == 0:
            return f"ratio denominator is 0 for every unit in {name}"
    unit_var = [stats.unit_variance(m, ratio) for m in (control, treatment)]
    if not any(v > 0 for v in unit_var):
        return "zero variance in both arms (every unit has the same value)"
    return None


def _covariate_usable(control: stats.Moments, treatment: stats.Moments, ratio: bool) -> bool:
    """The pre-period covariate helps only if it varies and (ratios) has a denominator."""
    k = 2 if ratio else 1
    pre = list(range(k, 2 * k))
    for m in (control, treatment):
        if ratio and m.mean[pre[1]] == 0:
            return False
    lin = [stats.unit_variance(m.take(pre), ratio) for m in (control, treatment)]
    return any(v > 0 for v in lin)


@dataclass(frozen=True)
class _Job:
    metric: Metric
    segment: str
    arm: str
    method: str
    control: stats.Moments
    treatment: stats.Moments


def plan_tests(cells: list[Cell], control: str, treatments: list[str],
               strict: frozenset[str] = frozenset()) -> tuple[list[_Job], list[dict]]:
    """Which test each metric × segment × arm gets (CUPED falls back when the covariate is
    flat). Untestable cells (zero variance, too few units) are skipped and listed, except
    the `all` segment of a metric in `strict` (asked for by name): that is an error. A run
    where nothing at all can be tested is an error too."""
    jobs, skipped = [], []
    for cell in cells:
        for arm in treatments:
            c, t = cell.arms[control], cell.arms[arm]
            ratio = cell.metric.is_ratio
            k = 2 if ratio else 1
            post = list(range(k))
            reason = _untestable(c.take(post), t.take(post), ratio)
            if reason:
                if cell.segment == "all" and cell.metric.name in strict:
                    raise AnalysisError(f"metric {cell.metric.name!r}, arm {arm!r} vs "
                                        f"{control!r}: cannot be tested: {reason}")
                skipped.append({"metric": cell.metric.name, "segment": cell.segment, "arm": arm,
                                "reason": reason})
                continue
            covariate = cell.covariate and _covariate_usable(c, t, ratio)
            if cell.covariate and not covariate:
                c, t = c.take(post), t.take(post)
            jobs.append(_Job(cell.metric, cell.segment, arm, cell.metric.method(covariate), c, t))
    if not any(j.segment == "all" for j in jobs):
        reasons = "; ".join(f"{s['metric']}: {s['reason']}" for s in skipped
                            if s["segment"] == "all")
        raise AnalysisError(f"no metric can be tested on all users ({reasons})")
    return jobs, skipped


def run_jobs(jobs: list[_Job], config: stats.TestConfig,
             alphas: list[float] | None = None) -> list[stats.TestResult]:
    """Run every test, one vectorized call per method (the statistics are stacked); with
    `alphas`, each job's CIs at its own level."""
    results: list[stats.TestResult | None] = [None] * len(jobs)
    by_method: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_method.setdefault(job.method, []).append(i)
    for method, idx in by_method.items():
        c = stats.Moments.stack([jobs[i].control for i in idx])
        t = stats.Moments.stack([jobs[i].treatment for i in idx])
        cfg = config if alphas is None else stats.TestConfig(np.array([alphas[i] for i in idx]))
        res = stats.run_test(method, c, t, cfg)
        for pos, i in enumerate(idx):
            results[i] = stats.TestResult(**{
                k: (v if k == "method" else np.asarray(v)[pos]) for k, v in vars(res).items()})
    return results  # type: ignore[return-value]


def family_of(metric: Metric, segment: str) -> str:
    """The multiple-testing family of a row: `primary`, `secondary` or `guardrail` on all
    users (confirmatory), `exploratory: segments` or `exploratory: days`."""
    if segment == "all":
        return metric.role
    return "exploratory: days" if segment.startswith("day=") else "exploratory: segments"


def _warnings(job: _Job, res: stats.TestResult, level: float) -> list[str]:
    """Why a row's relative uplift needs care (or has no CI)."""
    out = []
    q = float(stats.sps.t.ppf(1 - level / 2, float(res.df)))
    if job.metric.is_ratio and not float(res.denominator_z) > stats.DENOMINATOR_Z:
        out.append(f"ratio denominator's mean is not clearly away from 0 (|mean|/se = "
                   f"{float(res.denominator_z):.2g} <= {stats.DENOMINATOR_Z:g} in an arm): the "
                   f"ratio is unstable, no relative CI")
    elif not np.isfinite(float(res.rel_se)):
        out.append("an arm has the same value for every unit: no relative CI")
    elif not float(res.base_z) > q:
        out.append("control mean is not significantly away from 0: no relative CI "
                   "(read the absolute CI)")
    if float(res.control_mean) < 0:
        out.append("control mean is negative: uplift is relative to |control| "
                   "(positive = treatment higher)")
    return out


ReplicateFn = Callable[[_Job, float], "stats.ReplicateResult | None"]
"""(job, level) -> the job's training-replicate test at that level, or None (one replicate)."""


def make_rows(jobs: list[_Job], results: list[stats.TestResult], correction: str,
              alpha: float = 0.05, replicate: ReplicateFn | None = None,
              replicates: dict[str, int] | None = None, control: str | None = None
              ) -> list[dict]:
    """Result rows with exactly `ROW_KEYS`; `p_adjusted` within each row's family
    (`family_of`), CIs at the family's decision level (`stats.decision_level`).

    `replicate(job, level)`: where an arm has several training replicates, the row's effect,
    CIs and p-value are the replicate-aware test's (`analysis.replicates`), and the family's
    adjustment uses that p-value; `replicates` (per arm) is what the rows report.
    """
    families = [family_of(j.metric, j.segment) for j in jobs]
    reps = [replicate(j, alpha) if replicate else None for j in jobs]
    p_raw = np.array([float(rp.p_value) if rp is not None else float(r.p_value)
                      for r, rp in zip(results, reps)])
    p_adj = np.full(len(jobs), np.nan)
    level = np.full(len(jobs), float(alpha))
    for fam in dict.fromkeys(families):
        idx = [i for i, f in enumerate(families) if f == fam]
        p_adj[idx] = stats.adjust(p_raw[idx], correction)
        level[idx] = stats.decision_level(p_raw[idx], correction, alpha)
    if jobs and np.any(level != alpha):
        results = run_jobs(jobs, stats.TestConfig(alpha), list(level))
    rows = []
    for job, res, pa, fam, lv, rp in zip(jobs, results, p_adj, families, level, reps):
        notes = _warnings(job, res, lv)
        rel_ci_ok = not (job.metric.is_ratio
                         and not float(res.denominator_z) > stats.DENOMINATOR_Z)
        ci_low, ci_high = _finite(res.ci_low), _finite(res.ci_high)
        if job.metric.nonnegative and float(res.control_mean) > 0:
            # values >= 0: the uplift is >= -100%, the interval is cut there (still valid)
            ci_low = None if ci_low is None else max(ci_low, -1.0)
            ci_high = None if ci_high is None else max(ci_high, -1.0)
        rows.append({
            "metric": job.metric.name, "segment": job.segment, "arm": job.arm,
            "control_mean": _finite(res.control_mean),
            "treatment_mean": _finite(res.treatment_mean),
            "abs_effect": _finite(res.abs_effect), "rel_effect": _finite(res.rel_effect),
            "ci_low": ci_low if rel_ci_ok else None,
            "ci_high": ci_high if rel_ci_ok else None,
            "abs_ci_low": _finite(res.abs_ci_low), "abs_ci_high": _finite(res.abs_ci_high),
            "p_value": _finite(res.p_value), "p_adjusted": _finite(pa),
            "n_control": int(res.n_control), "n_treatment": int(res.n_treatment),
            "method": res.method, "family": fam, "exploratory": fam.startswith("exploratory"),
            "ci_level": float(1.0 - lv), "warning": "; ".join(notes) or None,
        })
        rows[-1].update(_replicate_fields(rows[-1], job, res, replicate(job, lv) if rp else None,
                                          replicates or {}, control))
    return rows


def _replicate_fields(row: dict, job: _Job, res: stats.TestResult,
                      rp: stats.ReplicateResult | None, replicates: dict[str, int],
                      control: str | None) -> dict:
    """The row's training-replicate keys; with a replicate test, its effect, CIs and p."""
    counts = {a: replicates.get(a, 1) for a in (control, job.arm) if a is not None}
    if rp is None:
        note = ("one training replicate per arm: the CI covers the users' randomness, not "
                "the training's (a retrained model is another draw)")
        if max(counts.values()) > 1:
            note = ("training replicates not testable here (days, or a replicate cell without "
                    "variance or denominator): the CI covers the users' randomness, not the "
                    "training's")
        warning = "; ".join(w for w in (row["warning"], note) if w)
        return {"replicates": counts, "training_sd": None, "user_se": _finite(res.abs_se),
                "per_replicate": [], "warning": warning}
    rel_ok = row["ci_low"] is not None or row["ci_high"] is not None
    return {
        "control_mean": _finite(rp.control_mean), "treatment_mean": _finite(rp.treatment_mean),
        "abs_effect": _finite(rp.abs_effect), "rel_effect": _finite(rp.rel_effect),
        "ci_low": _finite(rp.ci_low) if rel_ok else None,
        "ci_high": _finite(rp.ci_high) if rel_ok else None,
        "abs_ci_low": _finite(rp.abs_ci_low), "abs_ci_high": _finite(rp.abs_ci_high),
        "p_value": _finite(rp.p_value), "method": f"{row['method']}+replicates",
        "replicates": counts, "training_sd": None if rp.training_sd is None
        else _finite(rp.training_sd), "user_se": _finite(rp.user_se),
        "per_replicate": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in p.items()}
                          for p in rp.per_replicate],
    }


def planned_days(manifest: dict) -> int | None:
    """The run's planned duration in days from the manifest (`days`, or `config.days`)."""
    for value in (manifest.get("days"), (manifest.get("config") or {}).get("days")):
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    return None


def _sequential(st: Statistics, metrics: list[Metric], control: str, treatments: list[str],
                covariate_methods: dict[tuple[str, str], str], config: AnalysisConfig,
                state: dict) -> list[dict]:
    """Always-valid (mSPRT) p-values and CIs of the cumulative effect at the end of each day.

    τ² per metric × arm is read from `state["tau2"]` or, the first time, fixed from the
    planned horizon `state["planned_days"]` (`stats.planned_tau2`, on the average effect per
    elapsed day for the absolute scale, see `stats.msprt`) and written into `state`. A
    relative τ² that is undefined at this analysis (no usable relative variance yet) is
    fixed at the first analysis that has one."""
    out = []
    tcfg = stats.TestConfig(config.alpha)
    horizon = state["planned_days"]
    tau_state = state.setdefault("tau2", {})
    for m in metrics:
        for arm in treatments:
            c_all, t_all = st.cumulative[m.name][control], st.cumulative[m.name][arm]
            method = covariate_methods.get((m.name, arm), m.method(False))
            k = 2 if m.is_ratio else 1
            if method == m.method(False) and c_all.k > k:
                c_all, t_all = c_all.take(list(range(k))), t_all.take(list(range(k)))
            looks = [i for i in range(len(st.days))
                     if _untestable(_at(c_all, i).take(list(range(k))),
                                    _at(t_all, i).take(list(range(k))), m.is_ratio) is None]
            if len(looks) < 1:
                continue
            c, t = _subset(c_all, looks), _subset(t_all, looks)
            res = stats.run_test(method, c, t, tcfg)
            elapsed = np.array([st.days[i] + 1.0 for i in looks])
            var = res.abs_se**2
            rel_var = res.rel_se**2
            key = f"{m.name}/{arm}"
            entry = tau_state.setdefault(key, {"metric": m.name, "arm": arm, "method": method,
                                               "abs_per_day": None, "rel": None,
                                               "fixed_at_day": {}})
            if entry["abs_per_day"] is None:
                e = elapsed[-1]
                entry["abs_per_day"] = _finite(stats.planned_tau2(var[-1] / e**2, e, horizon,
                                                                  stats.MSPRT_RHO))
                entry["fixed_at_day"]["abs"] = int(st.days[looks[-1]])
            usable_rel = np.flatnonzero(np.isfinite(rel_var) & (rel_var > 0))
            if entry["rel"] is None and usable_rel.size:
                j = usable_rel[-1]
                entry["rel"] = _finite(stats.planned_tau2(rel_var[j], elapsed[j], horizon,
                                                          stats.MSPRT_RHO))
                entry["fixed_at_day"]["rel"] = int(st.days[looks[j]])
            tau_abs = entry["abs_per_day"] if entry["abs_per_day"] is not None else np.nan
            tau_rel = entry["rel"] if entry["rel"] is not None else np.nan
            # cumulative per-user effects grow with exposure, not necessarily linearly: each
            # look's own always-valid interval, not the running intersection (never empty)
            seq = stats.msprt(res.abs_effect, var, alpha=config.alpha, tau2=tau_abs,
                              elapsed=elapsed, intersect=False)
            rel_seq = stats.msprt(res.rel_effect, rel_var, alpha=config.alpha, tau2=tau_rel,
                                  intersect=False)
            mde = stats.mde(res.abs_se, alpha=config.alpha, power=config.power)
            with np.errstate(divide="ignore", invalid="ignore"):  # a 0 control mean: n/a
                mde_rel = mde / np.abs(res.control_mean)
            out.append({
                "metric": m.name, "arm": arm, "method": method,
                "day": [st.days[i] for i in looks],
                "abs_effect": _list(res.abs_effect), "rel_effect": _list(res.rel_effect),
                "p_value_fixed": _list(res.p_value),
                "ci_low_fixed": _list(res.ci_low), "ci_high_fixed": _list(res.ci_high),
                "p_value_always_valid": _list(seq.p_value),
                "abs_ci_low_always_valid": _list(seq.ci_low),
                "abs_ci_high_always_valid": _list(seq.ci_high),
                "ci_low_always_valid": _list(rel_seq.ci_low),
                "ci_high_always_valid": _list(rel_seq.ci_high),
                "mde_rel": _list(mde_rel),
                "tau2_abs_per_day": entry["abs_per_day"], "tau2_rel": entry["rel"],
                "tau2_fixed_at_day": dict(entry["fixed_at_day"]),
            })
    return out


def _initial_state(info: StoreInfo, state: dict | None, days: list[int]) -> dict:
    """The analysis state to continue from: the given one (checked), or a new one whose
    planned horizon is the manifest's `days` (else the days observed now)."""
    exp = info.manifest.experiment_id
    if state:
        if state.get("version") != STATE_VERSION or state.get("experiment_id") != exp:
            raise AnalysisError(
                f"analysis state: written for experiment {state.get('experiment_id')!r} "
                f"(version {state.get('version')!r}), this run is {exp!r} (version "
                f"{STATE_VERSION}); analyse into another output folder or delete its "
                f"analysis_state.json to start the sequential looks over")
        return json_copy(state)
    planned = planned_days(info.manifest.raw)
    return {"version": STATE_VERSION, "experiment_id": exp,
            "planned_days": planned if planned is not None else len(days),
            "horizon_source": "manifest" if planned is not None else "observed days",
            "rho": stats.MSPRT_RHO, "tau2": {}}


def json_copy(obj: dict) -> dict:
    """A deep copy of a JSON-like dict."""
    import json
    return json.loads(json.dumps(obj))


def _at(m: stats.Moments, i: int) -> stats.Moments:
    return stats.Moments(m.n[i], m.sums[i], m.cross[i],
                         None if m.shift is None else m.shift[i])


def _subset(m: stats.Moments, idx: list[int]) -> stats.Moments:
    return stats.Moments(m.n[idx], m.sums[idx], m.cross[idx],
                         None if m.shift is None else m.shift[idx])


def _list(a: np.ndarray) -> list[float | None]:
    return [_finite(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def _power(jobs: list[_Job], results: list[stats.TestResult], info: StoreInfo, control: str,
           config: AnalysisConfig) -> list[dict]:
    """Minimum detectable effect of each primary metric (segment `all`) and whether the run
    can detect the target uplift; the units a run would need for it at the same allocation."""
    shares = info.manifest.arms
    total = sum(shares.values())
    out = []
    for job, res in zip(jobs, results):
        if job.segment != "all" or not job.metric.primary:
            continue
        mde_abs = float(stats.mde(res.abs_se, alpha=config.alpha, power=config.power))
        base = abs(float(res.control_mean))
        mde_rel = mde_abs / base if base > 0 else math.inf
        target_abs = config.target_uplift * base
        unit_var_c = float(res.var_control * res.n_control)
        unit_var_t = float(res.var_treatment * res.n_treatment)
        needed = (float(stats.required_units(
            target_abs, unit_var_c, unit_var_t, control_share=shares[control] / total,
            treatment_share=shares[job.arm] / total, alpha=config.alpha, power=config.power))
            if target_abs > 0 else math.inf)
        have = float(res.n_control + res.n_treatment)
        power_target = float(stats.power_at(target_abs, res.abs_se, alpha=config.alpha))
        out.append({
            "metric": job.metric.name, "arm": job.arm, "method": job.method,
            "mde_abs": _finite(mde_abs), "mde_rel": _finite(mde_rel),
            "target_uplift": config.target_uplift, "power_at_target": _finite(power_target),
            "units": int(have), "units_needed_for_target": _finite(needed),
            "underpowered": bool(mde_rel > config.target_uplift),
        })
    return out


def analyze_run(run_dir: str | Path, db_path: str | Path, config: AnalysisConfig = AnalysisConfig(),
                progress: Callable[[str], None] | None = None,
                state: dict | None = None) -> Analysis:
    """Analyse a run directory; returns the results, details and the analysis state (the
    sequential τ², from `state` when given: the previous analysis's), writes only the DuckDB
    views. Every failure on the input is an `AnalysisError`."""
    try:
        return _analyze_run(run_dir, db_path, config, progress, state)
    except stats.StatsError as exc:
        raise AnalysisError(f"{run_dir}: {exc}") from exc
    except duckdb.Error as exc:
        raise AnalysisError(f"{run_dir}: DuckDB could not read the run's files: {exc}") from exc


def _analyze_run(run_dir: str | Path, db_path: str | Path, config: AnalysisConfig,
                 progress: Callable[[str], None] | None, state: dict | None) -> Analysis:
    timings: dict[str, float] = {}
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    pool = select_metrics(config)
    metrics = get_metrics(config.metrics, pool)
    strict = frozenset((config.metrics or ()) + (config.primary or ()))
    say("building the DuckDB views")
    info = build_store(run_dir, db_path)
    with connect(info.db_path, threads=config.threads) as con:
        metrics, not_applicable = applicable_metrics(con, info, metrics, list(pool.values()),
                                                     strict)
    control = config.control or info.manifest.control
    if control not in info.manifest.arms:
        raise AnalysisError(f"control arm {control!r} is not an arm of the run "
                            f"{sorted(info.manifest.arms)} (manifest.json)")
    treatments = [a for a in info.manifest.arms if a != control]
    timings["store"] = time.perf_counter() - t0
    say("aggregating events per user in DuckDB")
    with connect(info.db_path, threads=config.threads) as con:
        t1 = time.perf_counter()
        st = collect(con, metrics, info)
        timings["aggregate"] = time.perf_counter() - t1
        timings.update({f"aggregate.{k}": v for k, v in st.timings.items()})
        exposed = dict(con.execute(
            "SELECT arm, count(DISTINCT user_id) FROM exp_events WHERE event_type = 'impression' "
            "GROUP BY arm").fetchall())
        health = slate_health(con, info)
        replicates = {}
        if config.bootstrap:
            say(f"bootstrap: {config.bootstrap} Poisson replicates in DuckDB")
            t1 = time.perf_counter()
            replicates = bootstrap_replicates(con, metrics, info, st.caps, config.bootstrap,
                                              config.seed, st.shifts)
            timings["bootstrap"] = time.perf_counter() - t1
    say("testing")
    t1 = time.perf_counter()
    srm = stats.srm_test(st.unit_counts, info.manifest.arms)
    exposure = (stats.srm_test({a: int(exposed.get(a, 0)) for a in info.manifest.arms},
                               info.manifest.arms) if exposed else None)
    cells, duplicates = drop_duplicate_cells(st.cells, info)
    jobs, skipped = plan_tests(cells, control, treatments,
                               frozenset(config.metrics or ()))
    tcfg = stats.TestConfig(config.alpha)
    results = run_jobs(jobs, tcfg)
    counts = replicate_counts(info, config.threads)
    replicate = None
    if any(r > 1 for r in counts.values()):
        say("training replicates: each (arm, replicate) cell aggregated on its own")
        cells = cell_statistics(info, metrics, config.threads)

        def replicate(job: _Job, level: float) -> stats.ReplicateResult | None:
            cell = cells.get((job.metric.name, job.segment))
            if cell is None or max(counts[control], counts[job.arm]) < 2:
                return None
            try:
                return replicate_result(cell, control, job.arm, counts, job.method, level)
            except stats.StatsError:  # a degenerate cell (no variance, no denominator)
                return None
    rows = make_rows(jobs, results, config.correction, config.alpha, replicate, counts, control)
    bootstrap_info = _apply_bootstrap(rows, jobs, replicates, control, tcfg)
    methods = {(j.metric.name, j.arm): j.method for j in jobs if j.segment == "all"}
    new_state = _initial_state(info, state, st.days)
    sequential = _sequential(st, metrics, control, treatments, methods, config, new_state)
    power = _power(jobs, results, info, control, config)
    timings["statistics"] = time.perf_counter() - t1
    srm_dict = {"p_value": srm.p_value, "statistic": srm.statistic, "df": srm.df,
                "expected_shares": srm.expected_shares, "expected_counts": srm.expected_counts,
                "observed_counts": srm.observed_counts, "threshold": srm.threshold,
                "mismatch": srm.mismatch, "exposure": None if exposure is None else {
                    "p_value": exposure.p_value, "statistic": exposure.statistic,
                    "df": exposure.df, "expected_counts": exposure.expected_counts,
                    "observed_counts": exposure.observed_counts,
                    "mismatch": exposure.mismatch}}
    details = {
        "experiment_id": info.manifest.experiment_id, "run_dir": str(Path(run_dir).resolve()),
        "control": control, "treatments": treatments, "arms": info.manifest.arms,
        "alpha": config.alpha, "correction": config.correction, "power": config.power,
        "target_uplift": config.target_uplift, "bootstrap": bootstrap_info,
        "pre_period": info.has_pre_period, "days": st.days, "replicates": counts,
        "replicate_summary": _replicate_summary(rows, config),
        "segments": [{"name": s.name, "level": s.level, "column": s.column}
                     for s in info.segments],
        "metrics": [{"name": m.name, "kind": m.kind, "primary": m.primary, "role": m.role,
                     "description": m.description, "cap_quantile": m.cap_quantile}
                    for m in metrics],
        "families": _family_summary(rows, config.alpha),
        "sequential_state": {k: new_state[k] for k in ("planned_days", "horizon_source",
                                                       "rho")},
        "caps": st.caps,
        "cuped": [{"metric": j.metric.name, "segment": j.segment, "arm": j.arm,
                   "variance_reduction": _finite(r.variance_reduction)}
                  for j, r in zip(jobs, results) if j.method.startswith("cuped")],
        "power_analysis": power, "sequential": sequential, "skipped": skipped,
        "not_applicable": not_applicable, "duplicates": duplicates, "health": health,
        "guardrails": guardrail_verdicts(rows, metrics),
    }
    timings["total"] = time.perf_counter() - t0
    return Analysis({"rows": rows, "srm": srm_dict}, details, timings, new_state)


def _replicate_summary(rows: list[dict], config: AnalysisConfig) -> list[dict]:
    """Per confirmatory row with replicates: how much of its variance is training noise
    (training_sd² / R over training_sd² / R + user_se²) and how many replicates per arm would
    detect the target uplift with the analysis' power at today's users
    (`stats.replicates_needed`; None: the users alone leave the CI too wide)."""
    out = []
    for r in rows:
        if r["segment"] != "all" or r["training_sd"] is None or r["exploratory"]:
            continue
        per_arm = min(r["replicates"].values())
        training_var = r["training_sd"] ** 2 / per_arm
        total = training_var + r["user_se"] ** 2
        base = abs(r["control_mean"]) if r["control_mean"] else None
        needed = (stats.replicates_needed(r["training_sd"], r["user_se"],
                                          config.target_uplift * base,
                                          alpha=config.alpha, power=config.power)
                  if base else None)
        out.append({"metric": r["metric"], "arm": r["arm"], "replicates": r["replicates"],
                    "training_sd": r["training_sd"], "user_se": r["user_se"],
                    "training_share": training_var / total if total > 0 else None,
                    "replicates_needed": needed, "target_uplift": config.target_uplift})
    return out


# A stack whose slates are at least this share cold items, or which shows fewer distinct
# items than one slate holds, is degenerate: its report gets a warning.
DEGENERATE_COLD_SHARE = 0.9


def slate_health(con: duckdb.DuckDBPyConnection, info: StoreInfo) -> dict:
    """Per arm, what its slates looked like (from the impressions): requests, mean slate
    length, share of short slates (fewer impressions than the manifest's `slate_size`),
    share of cold items, distinct items shown; with warnings for a degenerate stack (slates
    of only cold items, one slate's worth of items for everything, short or empty slates).
    Beam coverage is not in the events (the stack summary has it) and is not reported."""
    cols = _columns(con, "exp_events")
    if "request_id" not in cols:
        return {"arms": {}, "warnings": [], "note": "no request_id column: no slate health"}
    slate_size = info.manifest.raw.get("slate_size")
    cold = "avg(is_cold_item::DOUBLE)" if "is_cold_item" in cols else "NULL"
    # (negative ids: unknown items of imported logs, not counted)
    item = ("NULLIF(count(DISTINCT item_id) FILTER (WHERE item_id >= 0), 0)"
            if "item_id" in cols else "NULL")
    rows = con.execute(f"""
        SELECT arm, count(DISTINCT request_id), count(*), {cold}, {item}
        FROM exp_events WHERE event_type = 'impression' GROUP BY arm ORDER BY arm""").fetchall()
    short = {}
    if isinstance(slate_size, int):
        short = dict(con.execute(f"""
            SELECT arm, avg((n < {slate_size})::DOUBLE) FROM (
                SELECT arm, request_id, count(*) AS n FROM exp_events
                WHERE event_type = 'impression' GROUP BY ALL) GROUP BY arm""").fetchall())
    all_requests = dict(con.execute("SELECT arm, count(DISTINCT request_id) FROM exp_events "
                                    "GROUP BY arm").fetchall())
    arms, warnings = {}, []
    for arm, n_req, n_imp, cold_share, n_items in rows:
        empty = 1.0 - n_req / all_requests[arm] if all_requests.get(arm) else None
        arms[arm] = {"requests": int(n_req), "impressions": int(n_imp),
                     "mean_slate": n_imp / n_req if n_req else None,
                     "cold_item_share": _finite(cold_share) if cold_share is not None else None,
                     "distinct_items": n_items, "short_slate_share": _finite(short[arm])
                     if arm in short else None, "requests_without_impressions": empty}
        if cold_share is not None and cold_share >= DEGENERATE_COLD_SHARE:
            warnings.append(f"arm {arm!r}: {100 * cold_share:.0f}% of its impressions are cold "
                            f"items: its stack looks degenerate (slates of cold items only); "
                            f"its results measure that, not the intended stack")
        if isinstance(slate_size, int) and n_items is not None and n_items <= slate_size:
            warnings.append(f"arm {arm!r}: only {n_items} distinct item(s) shown in "
                            f"{n_req} slates: its stack looks degenerate")
        if short.get(arm, 0) > 0.5:
            warnings.append(f"arm {arm!r}: {100 * short[arm]:.0f}% of its slates hold fewer "
                            f"than {slate_size} items")
        if empty is not None and empty > 0.05:
            warnings.append(f"arm {arm!r}: {100 * empty:.0f}% of its requests show no item")
    for arm in info.manifest.arms:
        if arm not in arms and "impression" in {t for (t,) in con.execute(
                "SELECT DISTINCT event_type FROM exp_events").fetchall()}:
            warnings.append(f"arm {arm!r}: no impressions at all (empty slates)")
    return {"arms": arms, "warnings": warnings, "slate_size": slate_size}


def guardrail_verdicts(rows: list[dict], metrics: list[Metric]) -> list[dict]:
    """Non-inferiority of each guardrail metric with a margin (all users, per arm): the
    treatment is not worse by more than `margin` (relative) when the row's relative CI
    (at its family's level) lies above −margin (below +margin when lower is better)."""
    by_name = {m.name: m for m in metrics}
    out = []
    for r in rows:
        m = by_name.get(r["metric"])
        if r["segment"] != "all" or m is None or not m.guardrail or m.margin is None:
            continue
        lo, hi = r["ci_low"], r["ci_high"]
        if lo is None or hi is None:
            verdict = "inconclusive (no relative CI)"
        elif m.higher_is_better:
            verdict = ("non-inferior" if lo > -m.margin
                       else "inferior" if hi < -m.margin else "inconclusive")
        else:
            verdict = ("non-inferior" if hi < m.margin
                       else "inferior" if lo > m.margin else "inconclusive")
        out.append({"metric": m.name, "arm": r["arm"], "margin": m.margin,
                    "higher_is_better": m.higher_is_better, "ci_low": lo, "ci_high": hi,
                    "ci_level": r["ci_level"], "verdict": verdict})
    return out


def _in_segment(column: str, expr: str | None) -> str | None:
    """`expr` restricted to the events of a flag column (idempotent)."""
    if expr is None:
        return None
    head = f"CASE WHEN {column} THEN "
    return expr if expr.startswith(head) else f"{head}{expr} ELSE 0 END"


def drop_duplicate_cells(cells: list[Cell], info: StoreInfo) -> tuple[list[Cell], list[dict]]:
    """Each test once: a metric in an event-level segment that is, expression for
    expression, another analysed metric on all users (`completed_orders_per_user` in
    `cold_item` = `cold_item_completed_orders_per_user` in `all`, and that metric in
    `cold_item` again) is dropped and listed with the row it duplicates."""
    columns = {s.name: s.column for s in info.segments if s.level == "event"}

    def signature(m: Metric, column: str | None) -> tuple:
        num, den = ((m.numerator, m.denominator) if column is None
                    else (_in_segment(column, m.numerator), _in_segment(column, m.denominator)))
        return (m.kind, num, den, m.cap_quantile, m.cuped)

    overall = {signature(c.metric, None): c.metric.name for c in cells if c.segment == "all"}
    keep, dropped = [], []
    for c in cells:
        twin = (overall.get(signature(c.metric, columns[c.segment]))
                if c.segment in columns else None)
        if twin is None:
            keep.append(c)
        else:
            dropped.append({"metric": c.metric.name, "segment": c.segment,
                            "same_as": f"{twin}@all"})
    return keep, dropped


def select_metrics(config: AnalysisConfig) -> dict[str, Metric]:
    """The metrics to choose from: the metrics file's (`config.metrics_file`) or the
    registry's, with `config.primary` (names) as the primary family when given (the other
    formerly primary metrics become secondary)."""
    if config.metrics_file is not None:
        try:
            pool = {m.name: m for m in load_metrics_file(config.metrics_file)}
        except ConfigError as exc:
            raise AnalysisError(str(exc)) from None
    else:
        pool = dict(REGISTRY)
    if config.primary:
        unknown = [n for n in config.primary if n not in pool]
        if unknown:
            raise AnalysisError(f"--primary: unknown metric(s) {unknown}; defined metrics: "
                                f"{sorted(pool)}")
        pool = {n: (m.with_role("primary") if n in config.primary
                    else m.with_role("secondary") if m.primary else m) for n, m in pool.items()}
    return pool


def applicable_metrics(con: duckdb.DuckDBPyConnection, info: StoreInfo, metrics: list[Metric],
                       defined: list[Metric], strict: frozenset[str] = frozenset()
                       ) -> tuple[list[Metric], list[dict]]:
    """Split `metrics` into those this run can measure and the not applicable ones (listed
    with the reason, not alarms): a metric is not applicable when none of the event types
    its numerator (or its denominator) reads occur in the run, or when it reads a column
    the events do not have. A metric asked for by name (`strict`) that is not applicable is
    an error; so is an event type in the run that no defined metric reads (a typo such as
    `clicks`), and an expression that is not valid SQL."""
    events_dir = info.run_dir / "events"
    present = [t for (t,) in con.execute(
        "SELECT DISTINCT event_type FROM events ORDER BY 1").fetchall()]
    known = event_types_read(defined)
    unknown = [t for t in present if t not in known]
    if known and unknown:
        raise AnalysisError(
            f"{events_dir}: column 'event_type': " + "; ".join(
                f"event_type {t!r} is not an event any metric reads" for t in unknown)
            + f"; known: {', '.join(known)} (fix the event names, or define a metric that "
              f"reads them in a --metrics file)")
    columns = _columns(con, "exp_events")
    keep, out = [], []
    for m in metrics:
        reason = None
        for part, label in (("y", "numerator"), ("x", "denominator")):
            expr = m.numerator if part == "y" else m.denominator
            if expr is None:
                continue
            types = m.event_types(part) if "event_type" in expr else set()
            if types and not types & set(present):
                reason = (f"no {' or '.join(sorted(types))} events in this run (its "
                          f"{label} reads them)")
                break
            try:
                con.execute(f"SELECT ({expr}) FROM exp_events LIMIT 0")
            except duckdb.BinderException as exc:
                col = re.search(r'column "([^"]+)" not found', str(exc))
                name = col.group(1) if col else str(exc).splitlines()[0]
                reason = (f"reads column '{name}', which the events do not have (found "
                          f"{sorted(columns)})")
                break
            except duckdb.Error as exc:
                raise AnalysisError(f"metric {m.name!r}: {label} {expr!r} is not a valid SQL "
                                    f"expression over the events: "
                                    f"{str(exc).splitlines()[0]}") from None
        if reason is None:
            keep.append(m)
            continue
        if m.name in strict:
            raise AnalysisError(f"{events_dir}: metric {m.name!r} cannot be measured on this "
                                f"run: it {reason}" if reason.startswith("reads")
                                else f"{events_dir}: metric {m.name!r} cannot be measured on "
                                     f"this run: {reason}")
        out.append({"metric": m.name, "reason": reason})
    if not keep:
        raise AnalysisError(f"{events_dir}: no metric applies to this run's events (event "
                            f"types {present}): " + "; ".join(
                                f"{x['metric']}: {x['reason']}" for x in out))
    return keep, out


def _family_summary(rows: list[dict], alpha: float) -> list[dict]:
    """Each multiple-testing family: its size, significant rows and CI level."""
    out: dict[str, dict] = {}
    for r in rows:
        f = out.setdefault(r["family"], {"family": r["family"], "exploratory": r["exploratory"],
                                         "rows": 0, "significant": 0, "ci_level": r["ci_level"]})
        f["rows"] += 1
        f["significant"] += int(r["p_adjusted"] is not None and r["p_adjusted"] < alpha)
    return list(out.values())


def _apply_bootstrap(rows: list[dict], jobs: list[_Job],
                     replicates: dict[tuple[str, str], dict[str, stats.Moments]], control: str,
                     config: stats.TestConfig) -> dict:
    """Replace the CIs of bootstrapped rows by percentile bootstrap CIs (method `+bootstrap`),
    each at its row's CI level. Degenerate replicates are dropped and counted."""
    if not replicates:
        return {"replicates": 0, "rows": 0, "dropped_replicates": 0, "dropped": []}
    done, dropped = 0, []
    for row, job in zip(rows, jobs):
        reps = replicates.get((job.metric.name, job.segment))
        if reps is None:
            continue
        c, t = reps[control], reps[job.arm]
        if job.control.k < c.k:  # the covariate was dropped for this row
            c, t = c.take(list(range(job.control.k))), t.take(list(range(job.control.k)))
        ci = stats.bootstrap_ci(c, t, job.method, stats.TestConfig(1.0 - row["ci_level"]))
        n_drop = int(ci.pop("dropped"))
        row.update({k: _finite(v) for k, v in ci.items()})
        row["method"] = job.method + "+bootstrap"
        if n_drop:
            dropped.append({"metric": job.metric.name, "segment": job.segment, "arm": job.arm,
                            "dropped": n_drop})
            note = (f"bootstrap: {n_drop} of {c.n.shape[0]} replicates degenerate (no variance) "
                    f"and dropped" + ("; too few left, no bootstrap CI"
                                      if row["abs_ci_low"] is None else ""))
            row["warning"] = "; ".join(w for w in (row["warning"], note) if w)
        done += 1
    return {"replicates": next(iter(next(iter(replicates.values())).values())).n.shape[0],
            "rows": done, "dropped_replicates": sum(d["dropped"] for d in dropped),
            "dropped": dropped}

"""The analysis engine: store → statistics → tests → results, as data (no report files).

`analyze_run` returns an `Analysis` (results and details) and writes nothing but the DuckDB
views file; `analysis.analyze.analyze` turns it into the report and the JSON files.

`results.json` = `{"rows": [...], "srm": {...}}`; each row has exactly the keys of
`ROW_KEYS`: one per metric × segment × treatment arm. `details.json` holds what does not fit
a row: CUPED variance reductions, power and minimum detectable effects, the sequential
(always-valid) looks by day, skipped cells and the run's settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis import stats
from analysis.metrics import (
    Cell,
    Metric,
    Statistics,
    bootstrap_replicates,
    collect,
    get_metrics,
)
from analysis.store import AnalysisError, StoreInfo, build_store, connect

ROW_KEYS = ("metric", "segment", "arm", "control_mean", "treatment_mean", "abs_effect",
            "rel_effect", "ci_low", "ci_high", "abs_ci_low", "abs_ci_high", "p_value",
            "p_adjusted", "n_control", "n_treatment", "method")


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
    threads: int | None = None

    def __post_init__(self) -> None:
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


def run_jobs(jobs: list[_Job], config: stats.TestConfig) -> list[stats.TestResult]:
    """Run every test, one vectorized call per method (the statistics are stacked)."""
    results: list[stats.TestResult | None] = [None] * len(jobs)
    by_method: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_method.setdefault(job.method, []).append(i)
    for method, idx in by_method.items():
        c = stats.Moments.stack([jobs[i].control for i in idx])
        t = stats.Moments.stack([jobs[i].treatment for i in idx])
        res = stats.run_test(method, c, t, config)
        for pos, i in enumerate(idx):
            results[i] = stats.TestResult(**{
                k: (v if k == "method" else np.asarray(v)[pos]) for k, v in vars(res).items()})
    return results  # type: ignore[return-value]


def make_rows(jobs: list[_Job], results: list[stats.TestResult], correction: str) -> list[dict]:
    """Result rows with exactly `ROW_KEYS`; `p_adjusted` across all rows."""
    p_adj = stats.adjust(np.array([float(r.p_value) for r in results]), correction) \
        if results else np.array([])
    rows = []
    for job, res, pa in zip(jobs, results, p_adj):
        rows.append({
            "metric": job.metric.name, "segment": job.segment, "arm": job.arm,
            "control_mean": _finite(res.control_mean),
            "treatment_mean": _finite(res.treatment_mean),
            "abs_effect": _finite(res.abs_effect), "rel_effect": _finite(res.rel_effect),
            "ci_low": _finite(res.ci_low), "ci_high": _finite(res.ci_high),
            "abs_ci_low": _finite(res.abs_ci_low), "abs_ci_high": _finite(res.abs_ci_high),
            "p_value": _finite(res.p_value), "p_adjusted": _finite(pa),
            "n_control": int(res.n_control), "n_treatment": int(res.n_treatment),
            "method": res.method,
        })
    return rows


def _sequential(st: Statistics, metrics: list[Metric], control: str, treatments: list[str],
                covariate_methods: dict[tuple[str, str], str],
                config: AnalysisConfig) -> list[dict]:
    """Always-valid (mSPRT) p-values and CIs of the cumulative effect at the end of each day."""
    out = []
    tcfg = stats.TestConfig(config.alpha)
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
            var = res.abs_se**2
            seq = stats.msprt(res.abs_effect, var, alpha=config.alpha,
                              tau2=stats.MSPRT_RHO * var[-1])
            rel_var = res.rel_se**2
            rel_seq = stats.msprt(res.rel_effect, rel_var, alpha=config.alpha,
                                  tau2=stats.MSPRT_RHO * rel_var[-1])
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
            })
    return out


def _at(m: stats.Moments, i: int) -> stats.Moments:
    return stats.Moments(m.n[i], m.sums[i], m.cross[i])


def _subset(m: stats.Moments, idx: list[int]) -> stats.Moments:
    return stats.Moments(m.n[idx], m.sums[idx], m.cross[idx])


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
                progress: Callable[[str], None] | None = None) -> Analysis:
    """Analyse a run directory; returns the results and details, writes only the DuckDB views."""
    timings: dict[str, float] = {}
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    metrics = get_metrics(config.metrics)
    say("building the DuckDB views")
    info = build_store(run_dir, db_path)
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
    jobs, skipped = plan_tests(st.cells, control, treatments,
                               frozenset(config.metrics or ()))
    tcfg = stats.TestConfig(config.alpha)
    results = run_jobs(jobs, tcfg)
    rows = make_rows(jobs, results, config.correction)
    bootstrap_info = _apply_bootstrap(rows, jobs, replicates, control, tcfg)
    methods = {(j.metric.name, j.arm): j.method for j in jobs if j.segment == "all"}
    sequential = _sequential(st, metrics, control, treatments, methods, config)
    power = _power(jobs, results, info, control, config)
    timings["statistics"] = time.perf_counter() - t1
    srm_dict = {"p_value": srm.p_value, "statistic": srm.statistic, "df": srm.df,
                "expected_shares": srm.expected_shares, "expected_counts": srm.expected_counts,
                "observed_counts": srm.observed_counts, "threshold": srm.threshold,
                "mismatch": srm.mismatch}
    details = {
        "experiment_id": info.manifest.experiment_id, "run_dir": str(Path(run_dir).resolve()),
        "control": control, "treatments": treatments, "arms": info.manifest.arms,
        "alpha": config.alpha, "correction": config.correction, "power": config.power,
        "target_uplift": config.target_uplift, "bootstrap": bootstrap_info,
        "pre_period": info.has_pre_period, "days": st.days,
        "segments": [{"name": s.name, "level": s.level, "column": s.column}
                     for s in info.segments],
        "metrics": [{"name": m.name, "kind": m.kind, "primary": m.primary,
                     "description": m.description, "cap_quantile": m.cap_quantile}
                    for m in metrics],
        "caps": st.caps,
        "cuped": [{"metric": j.metric.name, "segment": j.segment, "arm": j.arm,
                   "variance_reduction": _finite(r.variance_reduction)}
                  for j, r in zip(jobs, results) if j.method.startswith("cuped")],
        "power_analysis": power, "sequential": sequential, "skipped": skipped,
    }
    timings["total"] = time.perf_counter() - t0
    return Analysis({"rows": rows, "srm": srm_dict}, details, timings)


def _apply_bootstrap(rows: list[dict], jobs: list[_Job],
                     replicates: dict[tuple[str, str], dict[str, stats.Moments]], control: str,
                     config: stats.TestConfig) -> dict:
    """Replace the CIs of bootstrapped rows by percentile bootstrap CIs (method `+bootstrap`)."""
    if not replicates:
        return {"replicates": 0, "rows": 0}
    done = 0
    for row, job in zip(rows, jobs):
        reps = replicates.get((job.metric.name, job.segment))
        if reps is None:
            continue
        c, t = reps[control], reps[job.arm]
        if job.control.k < c.k:  # the covariate was dropped for this row
            c, t = c.take(list(range(job.control.k))), t.take(list(range(job.control.k)))
        ci = stats.bootstrap_ci(c, t, job.method, config)
        row.update({k: _finite(v) for k, v in ci.items()})
        row["method"] = job.method + "+bootstrap"
        done += 1
    return {"replicates": next(iter(next(iter(replicates.values())).values())).n.shape[0],
            "rows": done}

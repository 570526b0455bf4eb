"""The statistics engine: sufficient statistics in, test results out.

Follows GrowthBook's gbstats: a statistic (`Moments`) is a small frozen dataclass of
sufficient statistics of k per-unit variables (`n`, `Σv`, `Σvvᵀ`) with `__add__`, so
shards and days combine by addition; a test is a pure function of two statistics and a
config that returns a result dataclass. DuckDB computes the sums; nothing here sees a row.

Every field may be a scalar or a numpy array with leading batch dimensions, and every test
is elementwise over them: 1,000 A/A replicates, or a bootstrap's replicates, go through the
same function in one call.

Estimators. An arm's estimate is a smooth function of its variables' means: the mean of y
(`welch`), a ratio ȳ/x̄ (`delta`), each with an optional pre-period covariate of the same
form (`cuped`, `cuped_delta`). The delta method linearizes each estimate into a per-unit
influence value; its unit-level covariance comes from the moments. CUPED subtracts θ times
the covariate's difference, θ the pooled within-arm slope (for a mean metric this is
exactly the treatment coefficient of the OLS fit y ~ 1 + arm + covariate). The difference's
variance is the sum of the arms' (Welch), with Welch-Satterthwaite degrees of freedom, so a
`welch` result is exactly scipy's `ttest_ind(equal_var=False)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

# Conventional SRM alarm level: a mismatch this unlikely means broken assignment or logging.
SRM_THRESHOLD = 1e-3
# mSPRT mixture variance as a multiple of the effect's variance at the last planned look:
# (1 + 1/r)(2 log(1/α) + log(1 + r)) is minimal near r = 8 for α = 0.05, so the
# always-valid interval is tightest at the end of the planned run.
MSPRT_RHO = 8.0


class StatsError(ValueError):
    """A test that cannot be computed from these statistics (zero variance, zero denominator)."""


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of k per-unit variables: `n`, `sums` (…, k), `cross` (…, k, k).

    `cross[..., i, j]` is Σ vᵢvⱼ over units. Leading dimensions are batch dimensions
    (replicates, days); `n` has the batch shape.
    """

    n: np.ndarray
    sums: np.ndarray
    cross: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Moments of per-unit values, shape (units,) or (units, k) (for tests and references)."""
        v = np.asarray(values, dtype=np.float64)
        v = v[:, None] if v.ndim == 1 else v
        return cls(np.float64(v.shape[0]), v.sum(axis=0), v.T @ v)

    @classmethod
    def stack(cls, items: list[Moments]) -> Moments:
        """Stack statistics of equal k along a new leading batch dimension."""
        return cls(np.stack([np.asarray(m.n, dtype=np.float64) for m in items]),
                   np.stack([m.sums for m in items]), np.stack([m.cross for m in items]))

    @property
    def k(self) -> int:
        """Number of variables."""
        return int(np.shape(self.sums)[-1])

    @property
    def mean(self) -> np.ndarray:
        """Means of the variables, shape (…, k)."""
        return np.asarray(self.sums) / np.asarray(self.n, dtype=np.float64)[..., None]

    @property
    def cov(self) -> np.ndarray:
        """Sample covariance (ddof = 1) of the variables, shape (…, k, k)."""
        n = np.asarray(self.n, dtype=np.float64)[..., None, None]
        mean = self.mean
        centered = np.asarray(self.cross) - n * mean[..., :, None] * mean[..., None, :]
        return centered / (n - 1.0)

    def take(self, index: list[int]) -> Moments:
        """The moments of a subset of the variables, in the order given."""
        idx = np.asarray(index)
        return Moments(self.n, np.asarray(self.sums)[..., idx],
                       np.asarray(self.cross)[..., idx[:, None], idx[None, :]])

    def __add__(self, other: Moments) -> Moments:
        return Moments(np.asarray(self.n) + np.asarray(other.n),
                       np.asarray(self.sums) + np.asarray(other.sums),
                       np.asarray(self.cross) + np.asarray(other.cross))


@dataclass(frozen=True)
class TestConfig:
    """What a test needs beyond the statistics: the level of its two-sided intervals."""

    alpha: float = 0.05


@dataclass(frozen=True)
class TestResult:
    """Effect of treatment vs control: absolute and relative, with CIs and the p-value.

    `abs_effect` is the (CUPED-adjusted, where the method says so) difference;
    `control_mean`/`treatment_mean` are the arms' unadjusted estimates; `rel_effect` is
    `abs_effect / control_mean` with a delta-method interval (`ci_low`, `ci_high`).
    `variance_reduction` is 1 − Var(adjusted)/Var(unadjusted) (0 without a covariate);
    `var_control`/`var_treatment` are the variances of each arm's (adjusted) estimate.
    """

    method: str
    control_mean: np.ndarray
    treatment_mean: np.ndarray
    abs_effect: np.ndarray
    abs_se: np.ndarray
    abs_ci_low: np.ndarray
    abs_ci_high: np.ndarray
    rel_effect: np.ndarray
    rel_se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    df: np.ndarray
    n_control: np.ndarray
    n_treatment: np.ndarray
    variance_reduction: np.ndarray
    var_control: np.ndarray
    var_treatment: np.ndarray


@dataclass(frozen=True)
class _Arm:
    """An arm linearized: point estimates (metric, covariate) and their unit-level covariance."""

    n: np.ndarray
    point: np.ndarray      # (…, p): the metric, then the covariate if any
    unit_cov: np.ndarray   # (…, p, p): covariance of the per-unit influence values


def _linearize(m: Moments, ratio: bool, cuped: bool) -> _Arm:
    """Point estimates and delta-method unit covariance of (metric[, covariate]) for one arm."""
    expected_k = (2 if ratio else 1) * (2 if cuped else 1)
    if m.k != expected_k:
        raise StatsError(f"expected moments of {expected_k} variables "
                         f"({'ratio' if ratio else 'mean'}{' + covariate' if cuped else ''}), "
                         f"got {m.k}")
    mean = m.mean
    k = m.k
    groups = [(0, 1), (2, 3)] if ratio else [(0,), (1,)]
    groups = groups[: 2 if cuped else 1]
    points, grads = [], []
    for group in groups:
        if ratio:
            num, den = mean[..., group[0]], mean[..., group[1]]
            if np.any(den == 0):
                raise StatsError("ratio denominator has mean 0 in an arm (no units with a "
                                 "positive denominator)")
            point = num / den
            grad = np.zeros(mean.shape)
            grad[..., group[0]] = 1.0 / den
            grad[..., group[1]] = -num / den**2
        else:
            point = mean[..., group[0]]
            grad = np.zeros(mean.shape)
            grad[..., group[0]] = 1.0
        points.append(point)
        grads.append(grad)
    g = np.stack(grads, axis=-2)  # (…, p, k)
    unit_cov = g @ m.cov @ np.swapaxes(g, -1, -2)
    assert unit_cov.shape[-1] == len(groups) and g.shape[-1] == k
    return _Arm(np.asarray(m.n, dtype=np.float64), np.stack(points, axis=-1), unit_cov)


def unit_variance(m: Moments, ratio: bool) -> np.ndarray:
    """Per-unit variance of a metric's estimate (of y, or of the linearized ratio ȳ/x̄)."""
    return _linearize(m, ratio, False).unit_cov[..., 0, 0]


def _compare(control: Moments, treatment: Moments, config: TestConfig, *, ratio: bool,
             cuped: bool, method: str) -> TestResult:
    c = _linearize(control, ratio, cuped)
    t = _linearize(treatment, ratio, cuped)
    var_c_raw = c.unit_cov[..., 0, 0] / c.n
    var_t_raw = t.unit_cov[..., 0, 0] / t.n
    effect = t.point[..., 0] - c.point[..., 0]
    if cuped:
        s_cov = (c.n - 1) * c.unit_cov[..., 0, 1] + (t.n - 1) * t.unit_cov[..., 0, 1]
        s_pre = (c.n - 1) * c.unit_cov[..., 1, 1] + (t.n - 1) * t.unit_cov[..., 1, 1]
        theta = np.divide(s_cov, s_pre, out=np.zeros(np.shape(s_cov)), where=s_pre > 0)
        effect = effect - theta * (t.point[..., 1] - c.point[..., 1])

        def adjusted(arm: _Arm) -> np.ndarray:
            s = arm.unit_cov
            return (s[..., 0, 0] - 2 * theta * s[..., 0, 1] + theta**2 * s[..., 1, 1]) / arm.n

        var_c, var_t = adjusted(c), adjusted(t)
        cov_effect_control = -(c.unit_cov[..., 0, 0] - theta * c.unit_cov[..., 0, 1]) / c.n
    else:
        var_c, var_t = var_c_raw, var_t_raw
        cov_effect_control = -var_c_raw
    var = var_c + var_t
    if np.any(~(var > 0)):
        raise StatsError("zero variance in both arms: every unit has the same value, "
                         "so there is nothing to test")
    se = np.sqrt(var)
    df = var**2 / (var_c**2 / (c.n - 1) + var_t**2 / (t.n - 1))
    p_value = 2.0 * sps.t.sf(np.abs(effect) / se, df)
    q = sps.t.ppf(1.0 - config.alpha / 2.0, df)
    base = c.point[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = effect / base
        rel_var = (var / base**2 + effect**2 * var_c_raw / base**4
                   - 2.0 * effect * cov_effect_control / base**3)
    rel_se = np.sqrt(np.maximum(rel_var, 0.0))
    # one arm constant (e.g. no unit with an event): the delta-method terms cancel near
    # -100% and would claim certainty, so the relative CI is left undefined (NaN -> null)
    rel_se = np.where((var_c_raw > 0) & (var_t_raw > 0), rel_se, np.nan)
    reduction = 1.0 - var / (var_c_raw + var_t_raw) if cuped else np.zeros(np.shape(var))
    return TestResult(
        method=method, control_mean=c.point[..., 0], treatment_mean=t.point[..., 0],
        abs_effect=effect, abs_se=se, abs_ci_low=effect - q * se, abs_ci_high=effect + q * se,
        rel_effect=rel, rel_se=rel_se, ci_low=rel - q * rel_se, ci_high=rel + q * rel_se,
        p_value=p_value, df=df, n_control=c.n, n_treatment=t.n, variance_reduction=reduction,
        var_control=var_c, var_treatment=var_t,
    )


def welch_test(control: Moments, treatment: Moments,
               config: TestConfig = TestConfig()) -> TestResult:
    """Two-sided Welch test on the difference of means (moments of one variable y)."""
    return _compare(control, treatment, config, ratio=False, cuped=False, method="welch")


def ratio_test(control: Moments, treatment: Moments,
               config: TestConfig = TestConfig()) -> TestResult:
    """Ratio metric Σy/Σx by the delta method (moments of numerator, denominator)."""
    return _compare(control, treatment, config, ratio=True, cuped=False, method="delta")


def cuped_test(control: Moments, treatment: Moments,
               config: TestConfig = TestConfig()) -> TestResult:
    """Mean metric adjusted by its pre-period covariate (moments of y, covariate)."""
    return _compare(control, treatment, config, ratio=False, cuped=True, method="cuped")


def cuped_ratio_test(control: Moments, treatment: Moments,
                     config: TestConfig = TestConfig()) -> TestResult:
    """Ratio metric with its pre-period ratio as covariate (moments of y, x, y_pre, x_pre)."""
    return _compare(control, treatment, config, ratio=True, cuped=True, method="cuped_delta")


TESTS = {"welch": welch_test, "delta": ratio_test, "cuped": cuped_test,
         "cuped_delta": cuped_ratio_test}


def run_test(method: str, control: Moments, treatment: Moments,
             config: TestConfig = TestConfig()) -> TestResult:
    """Dispatch to the test named `method` (welch, delta, cuped, cuped_delta)."""
    try:
        test = TESTS[method]
    except KeyError:
        raise StatsError(f"unknown test method {method!r} (expected one of {sorted(TESTS)})")
    return test(control, treatment, config)


def bootstrap_ci(control_reps: Moments, treatment_reps: Moments, method: str,
                 config: TestConfig = TestConfig()) -> dict[str, np.ndarray]:
    """Percentile bootstrap CIs of the absolute and relative effect.

    The replicates are moments with a leading replicate axis (e.g. Poisson-weighted sums
    computed in DuckDB); each replicate is re-estimated with the same estimator (θ too for
    CUPED), all at once. Returns `abs_ci_low/high`, `ci_low/high` (relative).
    """
    res = _compare(control_reps, treatment_reps, config, ratio=method in ("delta", "cuped_delta"),
                   cuped=method in ("cuped", "cuped_delta"), method=method)
    lo, hi = 100 * config.alpha / 2, 100 * (1 - config.alpha / 2)
    abs_q = np.percentile(res.abs_effect, [lo, hi], axis=0)
    rel_q = np.percentile(res.rel_effect, [lo, hi], axis=0)
    # as in the analytic CI: an arm constant in every replicate leaves the relative CI undefined
    rel_q = np.where(np.isnan(res.rel_se).all(axis=0), np.nan, rel_q)
    return {"abs_ci_low": abs_q[0], "abs_ci_high": abs_q[1],
            "ci_low": rel_q[0], "ci_high": rel_q[1]}


@dataclass(frozen=True)
class SequentialResult:
    """Always-valid p-values and CIs along the looks (last axis): valid at every look at once."""

    p_value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def msprt(effect: np.ndarray, variance: np.ndarray, *, alpha: float = 0.05,
          tau2: np.ndarray | float) -> SequentialResult:
    """Mixture SPRT (normal mixture N(0, τ²) over the effect) for a sequence of looks.

    `effect[..., j]`, `variance[..., j]` are the estimate and its variance at look j (on the
    cumulative data). The likelihood ratio is Λ = √(V/(V+τ²)) exp(τ²Δ²/(2V(V+τ²))); the
    always-valid p-value is the running minimum of 1/Λ and the CI the running intersection
    of {δ : Λ(Δ−δ) < 1/α} (Johari et al., "Always valid inference", 2017).
    """
    effect = np.asarray(effect, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    tau2 = np.asarray(tau2, dtype=np.float64)
    if tau2.ndim:
        tau2 = tau2[..., None]
    log_lr = 0.5 * np.log(v / (v + tau2)) + tau2 * effect**2 / (2.0 * v * (v + tau2))
    p = np.minimum.accumulate(np.minimum(1.0, np.exp(-log_lr)), axis=-1)
    half = np.sqrt(v * (v + tau2) / tau2 * (2.0 * np.log(1.0 / alpha) + np.log((v + tau2) / v)))
    low = np.maximum.accumulate(effect - half, axis=-1)
    high = np.minimum.accumulate(effect + half, axis=-1)
    return SequentialResult(p, low, high)


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio-mismatch check: chi-square of observed unit counts vs the allocation."""

    p_value: float
    statistic: float
    df: int
    observed_counts: dict[str, int]
    expected_shares: dict[str, float]
    expected_counts: dict[str, float]
    threshold: float

    @property
    def mismatch(self) -> bool:
        """True when the counts are too unlikely under the allocation (p < threshold)."""
        return self.p_value < self.threshold


def srm_test(observed: Mapping[str, int], shares: Mapping[str, float],
             threshold: float = SRM_THRESHOLD) -> SrmResult:
    """Chi-square goodness of fit of the arms' unit counts against their allocation shares."""
    arms = list(shares)
    missing = [a for a in arms if a not in observed]
    extra = [a for a in observed if a not in shares]
    if missing or extra:
        raise StatsError(f"SRM: arms with counts {sorted(observed)} do not match the allocation "
                         f"{sorted(shares)} (missing {missing}, unexpected {extra})")
    obs = np.array([observed[a] for a in arms], dtype=np.float64)
    share = np.array([shares[a] for a in arms], dtype=np.float64)
    if np.any(share <= 0) or len(arms) < 2:
        raise StatsError(f"SRM: allocation needs two or more arms with positive shares, got "
                         f"{dict(shares)}")
    share = share / share.sum()
    expected = obs.sum() * share
    stat = float(np.sum((obs - expected) ** 2 / expected))
    df = len(arms) - 1
    return SrmResult(float(sps.chi2.sf(stat, df)), stat, df,
                     {a: int(observed[a]) for a in arms},
                     {a: float(s) for a, s in zip(arms, share)},
                     {a: float(e) for a, e in zip(arms, expected)}, threshold)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error control)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate control)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")[::-1]
    ranks = np.arange(m, 0, -1)
    stepped = np.minimum.accumulate(p[order] * m / ranks)
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg}


def adjust(p_values: np.ndarray, method: str) -> np.ndarray:
    """Adjust p-values for multiplicity with `holm` or `bh`."""
    try:
        return CORRECTIONS[method](p_values)
    except KeyError:
        raise StatsError(f"unknown correction {method!r} (expected one of {sorted(CORRECTIONS)})")


def mde(se: np.ndarray, *, alpha: float = 0.05, power: float = 0.8) -> np.ndarray:
    """Minimum detectable absolute effect of a two-sided test at `alpha` with `power`,
    given the effect's standard error: (z₁₋α/₂ + z_power) · se, with
    se = √(σ²_c/n_c + σ²_t/n_t) for the planned sample sizes (CUPED-adjusted σ² where
    used)."""
    return (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * np.asarray(se)


def power_at(effect: np.ndarray, se: np.ndarray, *, alpha: float = 0.05) -> np.ndarray:
    """Power of the two-sided test to detect an absolute `effect` when the estimate has
    standard error `se` (both tails counted)."""
    z = sps.norm.ppf(1 - alpha / 2)
    shift = np.abs(np.asarray(effect, dtype=np.float64)) / np.asarray(se)
    return sps.norm.cdf(shift - z) + sps.norm.cdf(-shift - z)


def required_units(effect: np.ndarray, var_control: np.ndarray, var_treatment: np.ndarray, *,
                   control_share: float, treatment_share: float, alpha: float = 0.05,
                   power: float = 0.8) -> np.ndarray:
    """Units (control + treatment) needed to detect an absolute `effect` with the planned
    allocation shares of the two arms (shares of the whole experiment's traffic)."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    total_share = control_share + treatment_share
    per_unit = np.asarray(var_control) / control_share + np.asarray(var_treatment) / treatment_share
    return z**2 * per_unit / np.asarray(effect, dtype=np.float64) ** 2 * total_share

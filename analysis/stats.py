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

import math
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
# A ratio ȳ/x̄ is analysed by linearizing 1/x̄; with the denominator's mean fewer than this
# many standard errors from 0 (its relative error above 20%) the linearization and the
# relative uplift are unreliable: the row gets a warning and no relative CI.
DENOMINATOR_Z = 5.0


class StatsError(ValueError):
    """A test that cannot be computed from these statistics (zero variance, zero denominator)."""


# Below this share of Σ(v − shift)² the centred sum of squares is rounding noise: the
# variance is not resolvable from the sums and counts as 0 (e.g. raw sums of values with
# mean 1e9 and sd 1; shifted sums do not get there).
RESOLUTION = 1e-10


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of k per-unit variables: `n`, `sums` (…, k), `cross` (…, k, k),
    taken about `shift` (…, k): `sums[..., i]` = Σ (vᵢ − shiftᵢ), `cross[..., i, j]` =
    Σ (vᵢ − shiftᵢ)(vⱼ − shiftⱼ) over units. `shift` None means 0 (raw power sums).

    A shift near the mean keeps the centred second moment Σ(v − s)² − n(v̄ − s)² free of
    cancellation (raw sums of values with mean 1e9 and sd 1 lose every digit); the SQL
    shifts by the pooled mean, `of` by the sample mean. Leading dimensions are batch
    dimensions (replicates, days); `n` has the batch shape.
    """

    n: np.ndarray
    sums: np.ndarray
    cross: np.ndarray
    shift: np.ndarray | None = None

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Moments of per-unit values, shape (units,) or (units, k), about their mean."""
        v = np.asarray(values, dtype=np.float64)
        v = v[:, None] if v.ndim == 1 else v
        shift = v.mean(axis=0)
        d = v - shift
        return cls(np.float64(v.shape[0]), d.sum(axis=0), d.T @ d, shift)

    @classmethod
    def stack(cls, items: list[Moments]) -> Moments:
        """Stack statistics of equal k along a new leading batch dimension."""
        shifts = None
        if any(m.shift is not None for m in items):
            shifts = np.stack([m.offset for m in items])
        return cls(np.stack([np.asarray(m.n, dtype=np.float64) for m in items]),
                   np.stack([m.sums for m in items]), np.stack([m.cross for m in items]),
                   shifts)

    @property
    def k(self) -> int:
        """Number of variables."""
        return int(np.shape(self.sums)[-1])

    @property
    def offset(self) -> np.ndarray:
        """The shift as an array of the sums' shape (zeros for raw sums)."""
        if self.shift is None:
            return np.zeros(np.shape(self.sums))
        return np.broadcast_to(np.asarray(self.shift, dtype=np.float64), np.shape(self.sums))

    @property
    def mean(self) -> np.ndarray:
        """Means of the variables, shape (…, k)."""
        return self.offset + np.asarray(self.sums) / np.asarray(self.n, dtype=np.float64)[..., None]

    @property
    def cov(self) -> np.ndarray:
        """Sample covariance (ddof = 1) of the variables, shape (…, k, k).

        A variance below `RESOLUTION` × Σ(v − shift)²/n is indistinguishable from rounding
        and is 0 (with its covariances), so "zero variance" is detected instead of tested.
        """
        n = np.asarray(self.n, dtype=np.float64)[..., None, None]
        centred_mean = np.asarray(self.sums) / n[..., 0]
        cross = np.asarray(self.cross, dtype=np.float64)
        centered = cross - n * centred_mean[..., :, None] * centred_mean[..., None, :]
        diag = np.diagonal(centered, axis1=-2, axis2=-1)
        raw = np.diagonal(cross, axis1=-2, axis2=-1)
        flat = diag <= RESOLUTION * raw
        if np.any(flat):
            keep = ~flat
            centered = centered * (keep[..., :, None] & keep[..., None, :])
        return centered / (n - 1.0)

    def reshift(self, shift: np.ndarray | float) -> Moments:
        """The same statistics about another shift (exact algebra; precision is that of the
        new shift's distance from the mean)."""
        new = np.broadcast_to(np.asarray(shift, dtype=np.float64), np.shape(self.sums))
        d = self.offset - new
        n = np.asarray(self.n, dtype=np.float64)
        sums = np.asarray(self.sums)
        cross = (np.asarray(self.cross) + d[..., :, None] * sums[..., None, :]
                 + sums[..., :, None] * d[..., None, :]
                 + n[..., None, None] * d[..., :, None] * d[..., None, :])
        return Moments(self.n, sums + n[..., None] * d, cross, np.array(new))

    def take(self, index: list[int]) -> Moments:
        """The moments of a subset of the variables, in the order given."""
        idx = np.asarray(index)
        shift = None if self.shift is None else self.offset[..., idx]
        return Moments(self.n, np.asarray(self.sums)[..., idx],
                       np.asarray(self.cross)[..., idx[:, None], idx[None, :]], shift)

    def __add__(self, other: Moments) -> Moments:
        if self.shift is not None or other.shift is not None:
            if not np.array_equal(self.offset, other.offset):
                other = other.reshift(self.offset)
        return Moments(np.asarray(self.n) + np.asarray(other.n),
                       np.asarray(self.sums) + np.asarray(other.sums),
                       np.asarray(self.cross) + np.asarray(other.cross), self.shift)


@dataclass(frozen=True)
class TestConfig:
    """What a test needs beyond the statistics: the level of its two-sided intervals (a
    scalar, or an array over the batch: each row's CI at its own multiplicity-adjusted
    level)."""

    alpha: float | np.ndarray = 0.05


@dataclass(frozen=True)
class TestResult:
    """Effect of treatment vs control: absolute and relative, with CIs and the p-value.

    `abs_effect` is the (CUPED-adjusted, where the method says so) difference;
    `control_mean`/`treatment_mean` are the arms' unadjusted estimates. The relative uplift
    is `rel_effect = abs_effect / |control_mean|`: positive means treatment higher, whatever
    the control's sign. Its CI (`ci_low`, `ci_high`) is Fieller's: the set of uplifts r with
    |abs_effect − r·|control|| ≤ q·sd(abs_effect − r·|control|), q the same t quantile as the
    absolute CI; so the relative CI excludes 0 exactly when the absolute test rejects. It is
    undefined (NaN) when the control mean is not significantly away from 0 at the CI's level
    (`base_z` ≤ q: the set is unbounded), or when an arm is constant. `rel_se` is the delta
    method's standard error of the uplift (used by the sequential looks).
    `base_z` = |control mean| / its standard error; `denominator_z` (ratios; NaN otherwise)
    = the smaller over arms of |mean denominator| / its standard error.
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
    base_z: np.ndarray
    denominator_z: np.ndarray


@dataclass(frozen=True)
class _Arm:
    """An arm linearized: point estimates (metric, covariate) and their unit-level covariance."""

    n: np.ndarray
    point: np.ndarray      # (…, p): the metric, then the covariate if any
    unit_cov: np.ndarray   # (…, p, p): covariance of the per-unit influence values
    den_z: np.ndarray      # |mean denominator| / its standard error (NaN for means)


def _linearize(m: Moments, ratio: bool, cuped: bool, strict: bool = True) -> _Arm:
    """Point estimates and delta-method unit covariance of (metric[, covariate]) for one arm.

    `strict=False` (bootstrap replicates): a zero denominator gives NaN instead of an error."""
    expected_k = (2 if ratio else 1) * (2 if cuped else 1)
    if m.k != expected_k:
        raise StatsError(f"expected moments of {expected_k} variables "
                         f"({'ratio' if ratio else 'mean'}{' + covariate' if cuped else ''}), "
                         f"got {m.k}")
    mean = m.mean
    cov = m.cov
    k = m.k
    groups = [(0, 1), (2, 3)] if ratio else [(0,), (1,)]
    groups = groups[: 2 if cuped else 1]
    points, grads = [], []
    n = np.asarray(m.n, dtype=np.float64)
    den_z = np.full(np.shape(n), np.nan)
    for gi, group in enumerate(groups):
        if ratio:
            num, den = mean[..., group[0]], mean[..., group[1]]
            if np.any(den == 0):
                if strict:
                    raise StatsError("ratio denominator has mean 0 in an arm (no units with a "
                                     "positive denominator)")
                den = np.where(den == 0, np.nan, den)
            if gi == 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    den_z = np.abs(den) / np.sqrt(cov[..., group[1], group[1]] / n)
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
    unit_cov = g @ cov @ np.swapaxes(g, -1, -2)
    assert unit_cov.shape[-1] == len(groups) and g.shape[-1] == k
    return _Arm(n, np.stack(points, axis=-1), unit_cov, den_z)


def unit_variance(m: Moments, ratio: bool) -> np.ndarray:
    """Per-unit variance of a metric's estimate (of y, or of the linearized ratio ȳ/x̄)."""
    return _linearize(m, ratio, False).unit_cov[..., 0, 0]


def fieller_relative(effect: np.ndarray, base: np.ndarray, var_effect: np.ndarray,
                     var_base: np.ndarray, cov_effect_base: np.ndarray,
                     q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fieller's interval for r = effect / |base| from jointly normal estimates.

    {r : (effect − r|b|)² ≤ q²·Var(effect − r|b|)} is the quadratic A r² − 2B r + C ≤ 0 with
    A = b² − q²Var(b), B = effect·|b| − q²Cov(effect, |b|), C = effect² − q²Var(effect). It is
    a bounded interval iff A > 0 (|b| significantly away from 0); else (NaN, NaN).
    """
    sign = np.sign(base)
    b = np.abs(base)
    c = sign * cov_effect_base
    a = b**2 - q**2 * var_base
    bb = effect * b - q**2 * c
    cc = effect**2 - q**2 * var_effect
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.maximum(bb**2 - a * cc, 0.0))
        low = np.where(a > 0, (bb - root) / a, np.nan)
        high = np.where(a > 0, (bb + root) / a, np.nan)
    return low, high


def _compare(control: Moments, treatment: Moments, config: TestConfig, *, ratio: bool,
             cuped: bool, method: str, strict: bool = True) -> TestResult:
    """The test. `strict=False` (bootstrap replicates): a degenerate replicate (no variance,
    zero denominator) gives NaN results instead of raising."""
    c = _linearize(control, ratio, cuped, strict)
    t = _linearize(treatment, ratio, cuped, strict)
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
    degenerate = ~(var > 0)
    if np.any(degenerate):
        if strict:
            raise StatsError("zero variance in both arms: every unit has the same value, "
                             "so there is nothing to test")
        var = np.where(degenerate, np.nan, var)
    se = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = var**2 / (var_c**2 / (c.n - 1) + var_t**2 / (t.n - 1))
        p_value = 2.0 * sps.t.sf(np.abs(effect) / se, df)
    q = sps.t.ppf(1.0 - np.asarray(config.alpha) / 2.0, df)
    base = c.point[..., 0]
    b = np.abs(base)
    c_eb = np.sign(base) * cov_effect_control
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = effect / b
        rel_var = var / b**2 + effect**2 * var_c_raw / b**4 - 2.0 * effect * c_eb / b**3
        base_z = b / np.sqrt(var_c_raw)
    rel_se = np.sqrt(np.maximum(rel_var, 0.0))
    # one arm constant (e.g. no unit with an event): the delta-method terms cancel near
    # -100% and would claim certainty, so the relative CI is left undefined (NaN -> null)
    both_vary = (var_c_raw > 0) & (var_t_raw > 0)
    rel_se = np.where(both_vary, rel_se, np.nan)
    ci_low, ci_high = fieller_relative(effect, base, var, var_c_raw, cov_effect_control, q)
    ci_low, ci_high = np.where(both_vary, ci_low, np.nan), np.where(both_vary, ci_high, np.nan)
    reduction = 1.0 - var / (var_c_raw + var_t_raw) if cuped else np.zeros(np.shape(var))
    den_z = np.fmin(c.den_z, t.den_z) if ratio else np.full(np.shape(var), np.nan)
    return TestResult(
        method=method, control_mean=c.point[..., 0], treatment_mean=t.point[..., 0],
        abs_effect=effect, abs_se=se, abs_ci_low=effect - q * se, abs_ci_high=effect + q * se,
        rel_effect=rel, rel_se=rel_se, ci_low=ci_low, ci_high=ci_high,
        p_value=p_value, df=df, n_control=c.n, n_treatment=t.n, variance_reduction=reduction,
        var_control=var_c, var_treatment=var_t, base_z=base_z, denominator_z=den_z,
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
    CUPED), all at once. A degenerate replicate (no variance in either arm, fewer than 2
    units, a zero denominator: a sparse cell drew almost nobody) is dropped and counted,
    never fatal. Returns `abs_ci_low/high`, `ci_low/high` (relative) and `dropped` (the
    number of replicates left out, per batch element); the CIs are NaN when fewer than half
    of the replicates are usable.
    """
    res = _compare(control_reps, treatment_reps, config, ratio=method in ("delta", "cuped_delta"),
                   cuped=method in ("cuped", "cuped_delta"), method=method, strict=False)
    usable = (np.isfinite(res.abs_effect) & np.isfinite(res.abs_se)
              & (np.asarray(control_reps.n) >= 2) & (np.asarray(treatment_reps.n) >= 2))
    dropped = (~usable).sum(axis=0)
    alpha = np.asarray(config.alpha, dtype=np.float64)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    abs_e = np.where(usable, res.abs_effect, np.nan)
    rel_ok = usable & np.isfinite(res.rel_effect)
    rel_e = np.where(rel_ok, res.rel_effect, np.nan)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN CI
            abs_q = _nanpercentile(abs_e, lo, hi)
            rel_q = _nanpercentile(rel_e, lo, hi)
    enough = usable.sum(axis=0) >= 0.5 * usable.shape[0]
    abs_q = np.where(enough, abs_q, np.nan)
    # as in the analytic CI: an arm constant in every replicate leaves the relative CI undefined
    rel_q = np.where(np.isnan(np.where(usable, res.rel_se, np.nan)).all(axis=0) | ~enough
                     | ~(rel_ok.sum(axis=0) >= 0.5 * usable.shape[0]), np.nan, rel_q)
    return {"abs_ci_low": abs_q[0], "abs_ci_high": abs_q[1],
            "ci_low": rel_q[0], "ci_high": rel_q[1], "dropped": dropped}


def _nanpercentile(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(low, high) percentiles over the replicate axis 0, ignoring NaN; `lo`/`hi` may vary
    over the batch (each row at its own level)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    if lo.ndim == 0:
        return np.nanpercentile(values, [float(lo), float(hi)], axis=0)
    flat = values.reshape(values.shape[0], -1)
    lo_f = np.broadcast_to(lo, values.shape[1:]).ravel()
    hi_f = np.broadcast_to(hi, values.shape[1:]).ravel()
    out = np.stack([[np.nanpercentile(flat[:, i], lo_f[i]) for i in range(flat.shape[1])],
                    [np.nanpercentile(flat[:, i], hi_f[i]) for i in range(flat.shape[1])]])
    return out.reshape((2,) + values.shape[1:])


@dataclass(frozen=True)
class SequentialResult:
    """Always-valid p-values and CIs along the looks (last axis): valid at every look at once."""

    p_value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def msprt(effect: np.ndarray, variance: np.ndarray, *, alpha: float = 0.05,
          tau2: np.ndarray | float, elapsed: np.ndarray | None = None,
          intersect: bool = True) -> SequentialResult:
    """Mixture SPRT (normal mixture N(0, τ²) over the effect) for a sequence of looks.

    `effect[..., j]`, `variance[..., j]` are the estimate and its variance at look j (on the
    cumulative data). The likelihood ratio is Λ = √(V/(V+τ²)) exp(τ²Δ²/(2V(V+τ²))); the
    always-valid p-value is the running minimum of 1/Λ and the CI the running intersection
    of {δ : Λ(Δ−δ) < 1/α} (Johari et al., "Always valid inference", 2017).

    τ² must be fixed before the looks (not re-tuned on the data at each re-analysis: a τ²
    proportional to the last look's variance makes every analysis a fixed |z| > 3.04 test,
    whose error grows with the number of analyses).

    The mixture assumes a constant effect whose estimate sharpens over the looks. A fixed
    population's cumulative per-unit sums do the reverse (their difference and its variance
    grow with time), so pass `elapsed` (e.g. days since the start, per look): the test then
    runs on the average effect per elapsed unit Δ/e (variance V/e²), whose variance falls,
    τ² is on that scale, and the CIs are scaled back to the cumulative effect (e·CI).

    A look with an undefined or non-positive variance adds no evidence: its p-value carries
    the running minimum and its CI the running intersection (infinite before the first
    usable look), so early undefined looks do not void the later ones.

    `intersect=False` gives each look's own interval {δ : Λ_j(Δ_j − δ) < 1/α}, without the
    running intersection: for an effect that changes over the looks (a cumulative per-user
    effect that grows with exposure, not linearly in time) the intersection is not valid and
    can be empty (low > high); each look's own interval is never empty, and is wider than the
    fixed-horizon interval at that look. An unusable look then has an infinite interval.
    The p-value stays the running minimum (a test of no effect at any look).
    """
    effect = np.asarray(effect, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    tau2 = np.asarray(tau2, dtype=np.float64)
    if tau2.ndim:
        tau2 = tau2[..., None]
    scale = np.ones(np.shape(effect)) if elapsed is None else np.broadcast_to(
        np.asarray(elapsed, dtype=np.float64), np.shape(effect))
    e, v = effect / scale, v / scale**2
    usable = np.isfinite(e) & np.isfinite(v) & (v > 0) & np.isfinite(tau2) & (tau2 > 0)
    e, v = np.where(usable, e, 0.0), np.where(usable, v, 1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_lr = 0.5 * np.log(v / (v + tau2)) + tau2 * e**2 / (2.0 * v * (v + tau2))
        p = np.where(usable, np.minimum(1.0, np.exp(-log_lr)), 1.0)
        half = np.sqrt(v * (v + tau2) / tau2 * (2.0 * np.log(1.0 / alpha) + np.log((v + tau2) / v)))
    low = np.where(usable, e - half, -np.inf)
    high = np.where(usable, e + half, np.inf)
    p = np.minimum.accumulate(p, axis=-1)
    if intersect:
        low, high = np.maximum.accumulate(low, axis=-1), np.minimum.accumulate(high, axis=-1)
    low, high = low * scale, high * scale
    return SequentialResult(p, low, high)


def planned_tau2(variance: np.ndarray, elapsed: float, horizon: float,
                 rho: float = 8.0) -> np.ndarray:
    """The mixture variance for `msprt`, fixed once from the planned horizon.

    `variance` is the variance of the (per-elapsed-unit, when `msprt` gets `elapsed`)
    effect at the first analysis, after `elapsed` of the planned `horizon` (days). It is
    extrapolated to the horizon as information growing linearly in time (V·e/T), and
    τ² = ρ·V(T) makes the always-valid interval tightest at the planned end (ρ = 8 for
    α = 0.05, `MSPRT_RHO`). Record it and reuse it at every later look.
    """
    horizon = max(float(horizon), float(elapsed))
    return rho * np.asarray(variance, dtype=np.float64) * float(elapsed) / horizon


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
    """Holm step-down adjusted p-values (family-wise error control). NaN p-values (untestable
    rows) stay NaN and do not count in the family."""
    return _adjust_finite(p_values, _holm)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate control). NaN p-values stay
    NaN and do not count in the family."""
    return _adjust_finite(p_values, _bh)


def _adjust_finite(p_values: np.ndarray, fn) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = fn(p[ok])
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def _bh(p: np.ndarray) -> np.ndarray:
    m = p.size
    order = np.argsort(p, kind="stable")[::-1]
    ranks = np.arange(m, 0, -1)
    stepped = np.minimum.accumulate(p[order] * m / ranks)
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg}


def adjust(p_values: np.ndarray, method: str) -> np.ndarray:
    """Adjust p-values for multiplicity with `holm` or `bh` (NaN p-values left out)."""
    try:
        return CORRECTIONS[method](p_values)
    except KeyError:
        raise StatsError(f"unknown correction {method!r} (expected one of {sorted(CORRECTIONS)})")


def decision_level(p_values: np.ndarray, method: str, alpha: float) -> float:
    """The per-row CI level α' whose intervals agree with the family's adjusted decisions:
    a row's CI at 1 − α' excludes 0 exactly when its adjusted p < α (for tests whose CI is
    the test's inversion).

    BH with R rejections among m: α' = R·α/m (Benjamini-Yekutieli FCR-adjusted intervals);
    no rejection: α/m. Holm with R rejections: α/(m − R + 1) (α/m when R = 0, α when all
    are rejected). A family of one: α.
    """
    p = np.asarray(p_values, dtype=np.float64)
    p = p[np.isfinite(p)]
    m = p.size
    if m <= 1:
        return float(alpha)
    r = int(np.sum(adjust(p, method) < alpha))
    if method == "bh":
        return float(alpha * max(r, 1) / m)
    return float(alpha / (m - r + 1) if r > 0 else alpha / m)


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


# --------------------------------------------------------------------------- replicates


def cell_estimates(cells: list[Moments], ratio: bool, cuped: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point estimate, variance of it from the users, units) of each training-replicate cell.

    Means: ȳ; ratios: Σnum/Σden with its delta-method variance. `cuped`: the moments also
    hold the pre-period covariate (same shape); every cell's estimate is then adjusted with
    one θ pooled within all cells, ȳ − θ(x̄ − x̄_pooled), variance
    (s_yy − 2θ s_yx + θ² s_xx) / n: the same adjustment in every cell, so it moves no cell
    relative to another and only removes user variance.
    """
    arms = [_linearize(m, ratio, cuped) for m in cells]
    n = np.array([float(a.n) for a in arms])
    point = np.array([float(a.point[0]) for a in arms])
    var = np.array([float(a.unit_cov[0, 0]) for a in arms]) / n
    if cuped:
        s_yx = np.array([float(a.unit_cov[0, 1]) for a in arms])
        s_xx = np.array([float(a.unit_cov[1, 1]) for a in arms])
        x = np.array([float(a.point[1]) for a in arms])
        denom = float(np.sum((n - 1) * s_xx))
        theta = float(np.sum((n - 1) * s_yx)) / denom if denom > 0 else 0.0
        point = point - theta * (x - float(np.sum(n * x) / n.sum()))
        var = (np.array([float(a.unit_cov[0, 0]) for a in arms]) - 2 * theta * s_yx
               + theta**2 * s_xx) / n
    return point, var, n


@dataclass(frozen=True)
class ReplicateResult:
    """The effect of a treatment over training replicates (see `replicate_test`)."""

    control_mean: float
    treatment_mean: float
    abs_effect: float
    abs_se: float
    df: float
    abs_ci_low: float
    abs_ci_high: float
    p_value: float
    rel_effect: float
    ci_low: float
    ci_high: float
    user_se: float
    training_sd: float | None
    per_replicate: list[dict]


def _arm_variance(points: np.ndarray, user_vars: np.ndarray) -> tuple[float, float, float | None]:
    """(variance of the arm's mean over replicates, its degrees of freedom, training variance
    of one replicate or None) for one arm's replicate cells."""
    r = len(points)
    if r >= 2:
        between = float(np.var(points, ddof=1))
        return between / r, float(r - 1), max(0.0, between - float(np.mean(user_vars)))
    return float(user_vars[0]), math.inf, None


def replicate_test(control_points: np.ndarray, control_vars: np.ndarray,
                   treatment_points: np.ndarray, treatment_vars: np.ndarray, *,
                   alpha: float = 0.05) -> ReplicateResult:
    """Treatment vs control when each arm's users are split over R training replicates.

    Each arm's estimate is the mean of its R cell estimates; the effect is their difference.
    A cell's estimate varies with its users and with its training (another seed, another
    model), so the sample variance S²ₐ of an arm's cell estimates covers both: Var(meanₐ)
    = S²ₐ / Rₐ with Rₐ − 1 degrees of freedom, and the effect's CI uses Welch-Satterthwaite
    df = V² / Σ (S²ₐ/Rₐ)² / (Rₐ − 1) with V = Σ S²ₐ/Rₐ (a random-effects mean; no pairing
    of replicates across arms). An arm with one replicate contributes its users' variance
    alone (its training noise is then not covered). The relative CI is Fieller's on
    effect / |control mean|. Also: `user_se` (the users-only SE of the same estimate),
    `training_sd` (method of moments: sqrt of the summed per-arm max(0, S²ₐ − mean user
    variance), the SD a single replicate pair's effect has from training alone),
    and each treatment replicate's effect against the pooled control, with its users-only CI.
    """
    cp, cv = np.asarray(control_points, float), np.asarray(control_vars, float)
    tp, tv = np.asarray(treatment_points, float), np.asarray(treatment_vars, float)
    vc, dfc, tau_c = _arm_variance(cp, cv)
    vt, dft, tau_t = _arm_variance(tp, tv)
    var = vc + vt
    terms = sum(v**2 / d for v, d in ((vc, dfc), (vt, dft)) if math.isfinite(d))
    df = var**2 / terms if terms > 0 else math.inf
    se = math.sqrt(var)
    base, effect = float(cp.mean()), float(tp.mean() - cp.mean())
    q = float(sps.t.ppf(1 - alpha / 2, df))
    p = float(2 * sps.t.sf(abs(effect) / se, df)) if se > 0 else math.nan
    low, high = fieller_relative(np.array(effect), np.array(base), np.array(var),
                                 np.array(vc), np.array(-vc), np.array(q))
    user_var = float(cv.mean() / len(cp) + tv.mean() / len(tp))
    taus = [t for t in (tau_c, tau_t) if t is not None]
    training_sd = math.sqrt(sum(taus)) if taus else None
    z = float(sps.norm.ppf(1 - alpha / 2))
    pooled_user = float(cv.mean() / len(cp))
    per = []
    for r, (pt, v) in enumerate(zip(tp, tv)):
        d, s = float(pt - base), math.sqrt(float(v) + pooled_user)
        per.append({"replicate": r, "abs_effect": d, "abs_ci_low": d - z * s,
                    "abs_ci_high": d + z * s,
                    "rel_effect": d / abs(base) if base else None,
                    "rel_ci_low": (d - z * s) / abs(base) if base else None,
                    "rel_ci_high": (d + z * s) / abs(base) if base else None})
    return ReplicateResult(
        control_mean=base, treatment_mean=float(tp.mean()), abs_effect=effect, abs_se=se,
        df=df, abs_ci_low=effect - q * se, abs_ci_high=effect + q * se, p_value=p,
        rel_effect=effect / abs(base) if base else math.nan,
        ci_low=float(low), ci_high=float(high), user_se=math.sqrt(user_var),
        training_sd=training_sd, per_replicate=per)


def replicates_needed(training_sd: float, user_se: float, target: float, *,
                      alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Replicates per arm for an effect of `target` (absolute) to be detected with `power`,
    keeping the users: SE(R)² ≈ training_sd² / R + user_se² (training_sd covers both arms'
    training noise); None when the users alone already leave the SE too wide."""
    needed_se = abs(target) / (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
    room = needed_se**2 - user_se**2
    if room <= 0:
        return None
    return max(1, math.ceil(training_sd**2 / room))

"""The statistics engine against reference implementations (scipy, statsmodels, bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analysis import stats
from analysis.stats import Moments


@pytest.mark.parametrize("seed, nc, nt, shift", [(0, 1000, 1200, 0.05), (1, 30, 17, 0.0),
                                                  (2, 5000, 5000, 0.3)])
def test_welch_equals_scipy_ttest_ind(seed, nc, nt, shift):
    rng = np.random.default_rng(seed)
    c = rng.lognormal(0.0, 1.0, nc)
    t = rng.lognormal(shift, 1.3, nt)
    res = stats.welch_test(Moments.of(c), Moments.of(t))
    ref = sps.ttest_ind(t, c, equal_var=False)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    ci = ref.confidence_interval(0.95)
    assert res.abs_effect == pytest.approx(t.mean() - c.mean(), rel=1e-12)
    assert res.abs_ci_low == pytest.approx(ci.low, rel=1e-9)
    assert res.abs_ci_high == pytest.approx(ci.high, rel=1e-9)
    assert res.df == pytest.approx(ref.df, rel=1e-9)


def test_welch_is_vectorized_over_a_batch():
    rng = np.random.default_rng(3)
    data = [(rng.normal(0, 1, 50), rng.normal(0.2, 2, 70)) for _ in range(5)]
    batch = stats.welch_test(Moments.stack([Moments.of(c) for c, _ in data]),
                             Moments.stack([Moments.of(t) for _, t in data]))
    ref = [sps.ttest_ind(t, c, equal_var=False).pvalue for c, t in data]
    np.testing.assert_allclose(batch.p_value, ref, rtol=1e-9)


def test_moments_add_like_shards():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(300, 3))
    whole = Moments.of(v)
    parts = Moments.of(v[:100]) + Moments.of(v[100:250]) + Moments.of(v[250:])
    # each shard is centred on its own mean; their sum is re-expressed about the first's
    np.testing.assert_allclose(parts.reshift(0.0).sums, v.sum(axis=0))
    np.testing.assert_allclose(parts.reshift(0.0).cross, v.T @ v)
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(parts.cov, np.cov(v, rowvar=False), rtol=1e-10)
    assert parts.n == 300


def test_relative_ci_is_the_delta_method():
    rng = np.random.default_rng(5)
    c, t = rng.exponential(2.0, 4000), rng.exponential(2.2, 3000)
    res = stats.welch_test(Moments.of(c), Moments.of(t))
    vc, vt = c.var(ddof=1) / c.size, t.var(ddof=1) / t.size
    mc, mt = c.mean(), t.mean()
    se = np.sqrt(vt / mc**2 + mt**2 * vc / mc**4)  # Var(mt/mc) by the delta method
    assert res.rel_effect == pytest.approx(mt / mc - 1, rel=1e-12)
    assert res.rel_se == pytest.approx(se, rel=1e-10)


@pytest.mark.parametrize("method", ["welch", "cuped"])
def test_relative_ci_is_undefined_when_an_arm_is_constant(method):
    # 0 of 1,100 treatment users with an event: the delta method would give rel = -100% with
    # a zero-width CI; the absolute CI and the p-value stay (control carries the variance)
    rng = np.random.default_rng(6)
    c = np.column_stack([(rng.random(1115) < 0.001).astype(float), rng.random(1115)])
    t = np.column_stack([np.zeros(1100), rng.random(1100)])
    if method == "welch":
        c, t = c[:, :1], t[:, :1]
    res = stats.run_test(method, Moments.of(c), Moments.of(t))
    assert res.rel_effect < -0.9  # -1 exactly without CUPED's covariate adjustment
    assert np.isnan(res.rel_se) and np.isnan(res.ci_low) and np.isnan(res.ci_high)
    assert np.isfinite(res.abs_ci_low) and res.abs_ci_low < 0 < res.abs_ci_high
    assert 0.05 < res.p_value < 1.0


def test_cuped_equals_ols_with_arm_and_covariate():
    rng = np.random.default_rng(6)
    n = 4000
    x = rng.lognormal(1.0, 0.7, 2 * n)
    arm = np.r_[np.zeros(n), np.ones(n)]
    y = 2.0 + 0.3 * arm + 0.8 * x + rng.normal(0.0, 1.0 + arm, 2 * n)  # heteroskedastic
    fit = sm.OLS(y, np.c_[np.ones(2 * n), arm, x]).fit(cov_type="HC2")
    res = stats.cuped_test(Moments.of(np.c_[y[:n], x[:n]]), Moments.of(np.c_[y[n:], x[n:]]))
    assert res.method == "cuped"
    assert res.abs_effect == pytest.approx(fit.params[1], rel=1e-10)
    # Same sandwich variance up to θ's own estimation error (O(1/n)).
    assert res.abs_se == pytest.approx(fit.bse[1], rel=2e-3)
    assert res.p_value == pytest.approx(fit.pvalues[1], rel=0.05)
    plain = stats.welch_test(Moments.of(y[:n]), Moments.of(y[n:]))
    assert res.variance_reduction == pytest.approx(1 - res.abs_se**2 / plain.abs_se**2, rel=1e-9)
    assert res.variance_reduction > 0.3


def _clicks(rng, n, lift=0.0):
    imps = rng.poisson(rng.gamma(2.0, 10.0, n)) + 0.0
    p = rng.beta(2, 18, n) * (1 + lift)
    return rng.binomial(imps.astype(int), np.clip(p, 0, 1)).astype(float), imps


def test_delta_ratio_ci_matches_a_large_bootstrap():
    rng = np.random.default_rng(7)
    n = 3000
    yc, xc = _clicks(rng, n)
    yt, xt = _clicks(rng, n, lift=0.05)
    res = stats.ratio_test(Moments.of(np.c_[yc, xc]), Moments.of(np.c_[yt, xt]))
    B = 2000
    ic = rng.integers(0, n, (B, n))
    it = rng.integers(0, n, (B, n))
    rc = yc[ic].sum(1) / xc[ic].sum(1)
    rt = yt[it].sum(1) / xt[it].sum(1)
    diff, rel = rt - rc, rt / rc - 1
    assert res.abs_effect == pytest.approx(yt.sum() / xt.sum() - yc.sum() / xc.sum(), rel=1e-12)
    assert res.abs_se == pytest.approx(diff.std(ddof=1), rel=0.05)
    assert res.rel_se == pytest.approx(rel.std(ddof=1), rel=0.05)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    width = hi - lo
    assert abs(res.abs_ci_low - lo) < 0.1 * width and abs(res.abs_ci_high - hi) < 0.1 * width


def test_bootstrap_ci_from_replicate_moments_matches_analytic_ci():
    rng = np.random.default_rng(8)
    n, B = 2000, 1000
    c, t = rng.lognormal(0, 1, n), rng.lognormal(0.1, 1, n)
    w_c, w_t = rng.poisson(1.0, (B, n)), rng.poisson(1.0, (B, n))

    def reps(v, w):  # Poisson-weighted moments, as the SQL computes them
        return Moments(w.sum(1).astype(float), (w @ v)[:, None], (w @ v**2)[:, None, None])

    ci = stats.bootstrap_ci(reps(c, w_c), reps(t, w_t), "welch")
    res = stats.welch_test(Moments.of(c), Moments.of(t))
    width = res.abs_ci_high - res.abs_ci_low
    assert abs(ci["abs_ci_low"] - res.abs_ci_low) < 0.1 * width
    assert abs(ci["abs_ci_high"] - res.abs_ci_high) < 0.1 * width
    rel_width = res.ci_high - res.ci_low
    assert abs(ci["ci_low"] - res.ci_low) < 0.1 * rel_width


def test_bootstrap_relative_ci_is_undefined_when_an_arm_is_constant():
    rng = np.random.default_rng(9)
    n, B = 1100, 200
    c, t = (rng.random(n) < 0.01).astype(float), np.zeros(n)
    w_c, w_t = rng.poisson(1.0, (B, n)), rng.poisson(1.0, (B, n))

    def reps(v, w):
        return Moments(w.sum(1).astype(float), (w @ v)[:, None], (w @ v**2)[:, None, None])

    ci = stats.bootstrap_ci(reps(c, w_c), reps(t, w_t), "welch")
    assert np.isnan(ci["ci_low"]) and np.isnan(ci["ci_high"])
    assert ci["abs_ci_low"] < 0 and np.isfinite(ci["abs_ci_high"])


def test_srm_equals_scipy_chisquare():
    observed = {"control": 5210, "treatment": 4790, "other": 2105}
    shares = {"control": 0.4, "treatment": 0.4, "other": 0.2}
    res = stats.srm_test(observed, shares)
    total = sum(observed.values())
    ref = sps.chisquare(list(observed.values()), [total * s for s in shares.values()])
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.mismatch  # 5210 vs 4790 at equal shares is p ~ 3e-5
    assert not stats.srm_test({"a": 1000, "b": 1010}, {"a": 0.5, "b": 0.5}).mismatch
    with pytest.raises(stats.StatsError, match="missing"):
        stats.srm_test({"a": 10}, {"a": 0.5, "b": 0.5})


def test_holm_and_bh_equal_statsmodels():
    p = np.random.default_rng(9).uniform(0, 0.2, 40) ** 2
    np.testing.assert_allclose(stats.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    np.testing.assert_allclose(stats.benjamini_hochberg(p),
                               multipletests(p, method="fdr_bh")[1], rtol=1e-12)


def test_mde_power_and_sample_size_agree():
    se = 0.8
    mde = stats.mde(se, alpha=0.05, power=0.8)
    assert mde == pytest.approx((1.959963985 + 0.841621234) * se, rel=1e-8)
    assert stats.power_at(mde, se, alpha=0.05) == pytest.approx(0.8, abs=1e-4)
    # Units needed for that MDE at a 30/70 split, back to the same standard error.
    var_c, var_t = 4.0, 9.0
    n = stats.required_units(0.1, var_c, var_t, control_share=0.3, treatment_share=0.7)
    se_n = np.sqrt(var_c / (0.3 * n) + var_t / (0.7 * n))
    assert stats.mde(se_n) == pytest.approx(0.1, rel=1e-10)
    # A simulation: power at the MDE is 80%.
    rng = np.random.default_rng(10)
    z = rng.normal(mde, se, 20000) / se
    assert np.mean(np.abs(z) > 1.959963985) == pytest.approx(0.8, abs=0.015)


def _peeking(rng, reps, n, days, effect=0.0):
    """Cumulative per-user moments at the end of each day: (reps, days) Moments per arm."""
    def arm(shift):
        daily = rng.exponential(1.0, (reps, n, days)) + shift
        cum = np.cumsum(daily, axis=2)
        return Moments(np.full((reps, days), float(n)), cum.sum(1)[..., None],
                       (cum**2).sum(1)[..., None, None])
    return arm(0.0), arm(effect)


def test_msprt_keeps_type_one_error_under_daily_peeking():
    rng = np.random.default_rng(12)
    c, t = _peeking(rng, reps=1000, n=400, days=14)
    res = stats.welch_test(c, t)
    var = res.abs_se**2
    seq = stats.msprt(res.abs_effect, var, alpha=0.05, tau2=stats.MSPRT_RHO * var[:, -1])
    ever = (seq.p_value[:, -1] < 0.05).mean()
    naive = (res.p_value < 0.05).any(axis=1).mean()
    assert ever <= 0.05
    assert naive > 0.08  # peeking at the fixed-horizon p-value does inflate the error
    covered = ((seq.ci_low <= 0) & (seq.ci_high >= 0)).all(axis=1).mean()
    assert covered >= 0.95
    assert np.all(np.diff(seq.p_value, axis=1) <= 0)  # running minimum: never un-rejects


def test_msprt_detects_a_real_effect_at_a_price_in_power():
    rng = np.random.default_rng(13)
    # 0.06 per user-day: ~90% power for the fixed-horizon test at day 14.
    c, t = _peeking(rng, reps=400, n=400, days=14, effect=0.06)
    res = stats.welch_test(c, t)
    var = res.abs_se**2
    seq = stats.msprt(res.abs_effect, var, alpha=0.05, tau2=stats.MSPRT_RHO * var[:, -1])
    sequential_power = (seq.p_value[:, -1] < 0.05).mean()
    fixed_power = (res.p_value[:, -1] < 0.05).mean()
    assert 0.5 < sequential_power < fixed_power

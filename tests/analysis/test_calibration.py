"""Calibration: A/A false-positive rates and CI coverage of a known effect.

1,000 replicates per check, vectorized: each replicate is reduced to its sufficient
statistics (sums over users) and every replicate goes through the test in one call. At
1,000 replicates the binomial standard error of a 5% rate is 0.69%, so the 3.6%–6.4%
band is ±2 standard errors; coverage of 95% CIs must land in 93%–97%.
"""

from __future__ import annotations

import numpy as np
import pytest

from analysis import stats
from analysis.stats import Moments

REPS = 1000
N = 2000  # units per arm


def moments(*variables: np.ndarray) -> Moments:
    """Per-replicate moments of per-unit variables, each of shape (reps, units)."""
    v = np.stack(variables, axis=-1)  # (reps, units, k)
    return Moments(np.full(v.shape[0], float(v.shape[1])), v.sum(axis=1),
                   np.einsum("rui,ruj->rij", v, v))


def spend(rng, shape, lift=0.0):
    """Per-user GMV-like values: 60% zeros, log-normal spend otherwise (heavy right tail)."""
    buy = rng.random(shape) < 0.4
    return buy * rng.lognormal(2.0, 1.0, shape) * (1.0 + lift)


TRUE_SPEND_MEAN = 0.4 * np.exp(2.0 + 0.5)


def clicks(rng, shape, lift=0.0, rate=None, imps_mean=None):
    """(clicks, impressions) per user; user CTRs vary (beta), activity varies (gamma)."""
    lam = rng.gamma(2.0, 10.0, shape) if imps_mean is None else imps_mean
    p = rng.beta(2.0, 18.0, shape) if rate is None else rate
    imps = rng.poisson(lam).astype(np.float64)
    return rng.binomial(imps.astype(np.int64), np.clip(p * (1 + lift), 0, 1)).astype(float), imps


def cuped_data(rng, shape, effect=0.0):
    pre = rng.lognormal(1.0, 0.7, shape)
    y = 2.0 + 0.8 * pre + rng.normal(0.0, 1.0, shape) + effect
    return y, pre


def ratio_cuped_data(rng, shape, lift=0.0):
    lam = rng.gamma(2.0, 10.0, shape)  # the same user activity and CTR in both periods
    p = rng.beta(2.0, 18.0, shape)
    y, x = clicks(rng, shape, lift, rate=p, imps_mean=lam)
    y0, x0 = clicks(rng, shape, 0.0, rate=p, imps_mean=lam)
    return y, x, y0, x0


def _fpr(res: stats.TestResult) -> float:
    return float(np.mean(res.p_value < 0.05))


def test_aa_false_positive_rate_mean_metric():
    rng = np.random.default_rng(100)
    res = stats.welch_test(moments(spend(rng, (REPS, N))), moments(spend(rng, (REPS, N))))
    assert 0.036 <= _fpr(res) <= 0.064


def test_aa_false_positive_rate_ratio_metric():
    rng = np.random.default_rng(101)
    res = stats.ratio_test(moments(*clicks(rng, (REPS, N))), moments(*clicks(rng, (REPS, N))))
    assert 0.036 <= _fpr(res) <= 0.064


def test_aa_false_positive_rate_cuped_metric():
    rng = np.random.default_rng(102)
    res = stats.cuped_test(moments(*cuped_data(rng, (REPS, N))),
                           moments(*cuped_data(rng, (REPS, N))))
    assert 0.036 <= _fpr(res) <= 0.064
    assert np.median(res.variance_reduction) > 0.5


def test_aa_false_positive_rate_cuped_ratio_metric():
    rng = np.random.default_rng(103)
    res = stats.cuped_ratio_test(moments(*ratio_cuped_data(rng, (REPS, N))),
                                 moments(*ratio_cuped_data(rng, (REPS, N))))
    assert 0.036 <= _fpr(res) <= 0.064
    assert np.median(res.variance_reduction) > 0.2


def _covers(low, high, truth) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


def test_ci_coverage_of_a_known_effect_mean_metric():
    rng = np.random.default_rng(104)
    lift = 0.10
    res = stats.welch_test(moments(spend(rng, (REPS, N))),
                           moments(spend(rng, (REPS, N), lift=lift)))
    assert 0.93 <= _covers(res.abs_ci_low, res.abs_ci_high, lift * TRUE_SPEND_MEAN) <= 0.97
    assert 0.93 <= _covers(res.ci_low, res.ci_high, lift) <= 0.97


def test_ci_coverage_of_a_known_effect_ratio_metric():
    rng = np.random.default_rng(105)
    lift = 0.08  # E[clicks]/E[impressions] = E[p] (independent), so the ratio moves by +8%
    res = stats.ratio_test(moments(*clicks(rng, (REPS, N))),
                           moments(*clicks(rng, (REPS, N), lift=lift)))
    assert 0.93 <= _covers(res.ci_low, res.ci_high, lift) <= 0.97
    assert 0.93 <= _covers(res.abs_ci_low, res.abs_ci_high, lift * 2 / 20) <= 0.97


def test_ci_coverage_of_a_known_effect_cuped_metric():
    rng = np.random.default_rng(106)
    effect = 0.25
    res = stats.cuped_test(moments(*cuped_data(rng, (REPS, N))),
                           moments(*cuped_data(rng, (REPS, N), effect=effect)))
    assert 0.93 <= _covers(res.abs_ci_low, res.abs_ci_high, effect) <= 0.97
    base = 2.0 + 0.8 * np.exp(1.0 + 0.7**2 / 2)
    assert 0.93 <= _covers(res.ci_low, res.ci_high, effect / base) <= 0.97


@pytest.mark.parametrize("method", ["welch", "delta"])
def test_stats_do_not_depend_on_replicate_batching(method):
    """The same replicate gives the same answer alone or in a batch (no cross-talk)."""
    rng = np.random.default_rng(107)
    data = spend(rng, (3, 500)) if method == "welch" else None
    if method == "welch":
        c, t = moments(data), moments(data[::-1])
    else:
        c, t = moments(*clicks(rng, (3, 500))), moments(*clicks(rng, (3, 500)))
    batch = stats.run_test(method, c, t)
    for i in range(3):
        one = stats.run_test(method, Moments(c.n[i], c.sums[i], c.cross[i]),
                             Moments(t.n[i], t.sums[i], t.cross[i]))
        assert float(one.p_value) == pytest.approx(float(batch.p_value[i]), rel=1e-12)

"""Calibration figures of the statistics engine (issue 17), seeded and vectorized.

Prints:
1. sequential A/A error of the always-valid p-value under daily re-analysis, 14 and 200
   looks, fixed population (cumulative per-user sums): τ² re-tuned at every analysis
   (the old rule, τ² = 8·V(last look)) against τ² fixed once from the planned horizon;
2. coverage of the relative-uplift CI (true +10%) at 30, 100 and 2,000 units per arm:
   delta method (old) against Fieller (new) and a log-ratio interval;
3. heavy-tailed GMV A/A at 200 vs 5,000 units: Welch raw, and winsorized at the pooled
   99.9% / 99% quantile;
4. ratio metric with a denominator mean near 0: coverage of the relative CI by the
   denominator's |mean|/se, and how often the new rule suppresses it;
5. numerics at mean 1e9 / sd 1 and 1e7 / sd 1: raw power sums against shifted sums and scipy.

Usage: python benchmarks/analysis_calibration.py [--reps 4000] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from analysis import stats
from analysis.stats import Moments


def moments(v: np.ndarray, shift: bool = True) -> Moments:
    """Per-replicate moments of (reps, units[, k]) values, about the replicate's first value."""
    v = v[..., None] if v.ndim == 2 else v
    s = v[:, :1, :] if shift else np.zeros_like(v[:, :1, :])
    d = v - s
    return Moments(np.full(v.shape[0], float(v.shape[1])), d.sum(1),
                   np.einsum("rui,ruj->rij", d, d), s[:, 0, :])


def spend(rng, shape, lift=0.0, sigma=1.0):
    buy = rng.random(shape) < 0.4
    return buy * rng.lognormal(2.0, sigma, shape) * (1.0 + lift)


def sequential(rng, reps: int, n: int, looks: int, chunk: int = 250) -> tuple[float, float]:
    """(old, new) A/A error: P(any daily analysis rejects at α = 0.05)."""
    old_hits = new_hits = 0
    for start in range(0, reps, chunk):
        r = min(chunk, reps - start)
        arms = []
        for _ in range(2):  # persistent user rates: heavy users are heavy every day
            lam = rng.gamma(0.5, 2.0, (r, n, 1))
            daily = rng.poisson(lam, (r, n, looks)).astype(np.float64)
            cum = np.cumsum(daily, axis=2)
            arms.append(Moments(np.full((r, looks), float(n)), cum.sum(1)[..., None],
                                (cum**2).sum(1)[..., None, None]))
        res = stats.welch_test(*arms)
        eff, var = res.abs_effect, res.abs_se**2
        elapsed = np.arange(1.0, looks + 1)
        # old: each daily analysis L re-tunes tau2 = 8 V_L and reads the running-min p at L
        old_reject = np.zeros(r, dtype=bool)
        for last in range(looks):
            seq = stats.msprt(eff[:, :last + 1], var[:, :last + 1],
                              tau2=stats.MSPRT_RHO * var[:, last])
            old_reject |= seq.p_value[:, -1] < 0.05
        # new: tau2 fixed at the first analysis (day 1) from the planned horizon
        tau2 = stats.planned_tau2(var[:, 0] / elapsed[0] ** 2, elapsed[0], looks)
        seq = stats.msprt(eff, var, tau2=tau2, elapsed=elapsed)
        old_hits += int(old_reject.sum())
        new_hits += int((seq.p_value[:, -1] < 0.05).sum())
    return old_hits / reps, new_hits / reps


def delta_rel_ci(res: stats.TestResult, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return res.rel_effect - q * res.rel_se, res.rel_effect + q * res.rel_se


def coverage(rng, reps: int, n: int, lift: float = 0.10) -> dict[str, float]:
    c, t = spend(rng, (reps, n)), spend(rng, (reps, n), lift)
    res = stats.welch_test(moments(c), moments(t))
    q = sps.t.ppf(0.975, res.df)
    lo, hi = delta_rel_ci(res, q)
    mc, mt = c.mean(1), t.mean(1)
    vc, vt = c.var(1, ddof=1) / n, t.var(1, ddof=1) / n
    with np.errstate(all="ignore"):
        se_log = np.sqrt(vc / mc**2 + vt / mt**2)
        log_lo = np.exp(np.log(mt / mc) - q * se_log) - 1
        log_hi = np.exp(np.log(mt / mc) + q * se_log) - 1

    def cov(a, b):
        ok = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(ok & (a <= lift) & (lift <= b)))

    sig_abs = res.p_value < 0.05
    excl_delta = (lo > 0) | (hi < 0)
    excl_f = (res.ci_low > 0) | (res.ci_high < 0)
    return {"delta": cov(lo, hi), "fieller": cov(res.ci_low, res.ci_high),
            "log_ratio": cov(log_lo, log_hi),
            "disagree_delta": float(np.mean(sig_abs != excl_delta)),
            "disagree_fieller": float(np.mean(sig_abs != excl_f))}


def heavy_tail(rng, reps: int, n_small: int = 200, n_large: int = 5000,
               sigma: float = 1.5) -> dict[str, float]:
    c, t = spend(rng, (reps, n_small), sigma=sigma), spend(rng, (reps, n_large), sigma=sigma)
    out = {"raw": float(np.mean(stats.welch_test(moments(c), moments(t)).p_value < 0.05))}
    pooled = np.concatenate([c, t], axis=1)
    for qq in (0.999, 0.99):
        cap = np.quantile(pooled, qq, axis=1)[:, None]
        res = stats.welch_test(moments(np.minimum(c, cap)), moments(np.minimum(t, cap)))
        out[f"cap_{qq:g}"] = float(np.mean(res.p_value < 0.05))
    return out


def ratio_near_zero(rng, reps: int, n: int = 400) -> list[tuple[float, float, float, float]]:
    """(den mean, median den_z, delta rel-CI coverage, share with the rel CI kept)."""
    out = []
    for den_mean in (0.05, 0.15, 0.3, 1.0):
        def arm(lift):
            x = rng.normal(den_mean, 1.0, (reps, n))
            y = den_mean * (1 + lift) + rng.normal(0.0, 1.0, (reps, n))  # not tied to x
            return moments(np.stack([y, x], axis=-1))
        res = stats.ratio_test(arm(0.0), arm(0.10))
        lo, hi = delta_rel_ci(res, sps.t.ppf(0.975, res.df))
        cov = float(np.mean((lo <= 0.10) & (0.10 <= hi)))
        kept = float(np.mean(res.denominator_z > stats.DENOMINATOR_Z))
        out.append((den_mean, float(np.median(res.denominator_z)), cov, kept))
    return out


def numerics(rng) -> list[tuple[float, float, float, float]]:
    out = []
    for mean in (1e7, 1e9):
        c = mean + rng.normal(0, 1, 5000)
        t = mean + 0.02 + rng.normal(0, 1, 5000)
        ref = float(sps.ttest_ind(t, c, equal_var=False).pvalue)
        raw_m = [Moments(np.float64(v.size), np.array([v.sum()]), np.array([[v @ v]]))
                 for v in (c, t)]
        try:
            raw = float(stats.welch_test(*raw_m).p_value)
        except stats.StatsError:
            raw = float("nan")  # the variance is not resolvable from raw sums
        shifted = float(stats.welch_test(Moments.of(c), Moments.of(t)).p_value)
        out.append((mean, ref, raw, shifted))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("1. sequential A/A error, daily re-analysis, fixed population (alpha 0.05)")
    for looks, n in ((14, 200), (200, 100)):
        old, new = sequential(rng, args.reps // 2, n, looks)
        print(f"   {looks:4d} looks, {n} users/arm: re-tuned tau2 {100 * old:.2f}%, "
              f"fixed tau2 {100 * new:.2f}%")
    print("2. relative CI coverage (true +10%, 95% CIs, GMV-like spend)")
    for n in (30, 100, 2000):
        cv = coverage(rng, args.reps, n)
        print(f"   {n:5d}/arm: delta {100 * cv['delta']:.1f}%, Fieller {100 * cv['fieller']:.1f}%,"
              f" log-ratio {100 * cv['log_ratio']:.1f}%; p vs rel-CI disagree: delta "
              f"{100 * cv['disagree_delta']:.2f}%, Fieller {100 * cv['disagree_fieller']:.2f}%")
    print("3. heavy-tailed GMV A/A, 200 vs 5,000 units (lognormal sigma 1.5, 60% zeros)")
    ht = heavy_tail(rng, args.reps)
    print("   " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in ht.items()))
    ht1 = heavy_tail(rng, args.reps, sigma=1.0)
    print("   sigma 1.0: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in ht1.items()))
    print("4. ratio with a denominator mean near 0 (sd 1, 400 units/arm, true +10%)")
    for den, z, cov, kept in ratio_near_zero(rng, args.reps // 2):
        print(f"   den mean {den:g}: median |mean|/se {z:.1f}, delta rel-CI coverage "
              f"{100 * cov:.1f}%, rel CI kept (z > {stats.DENOMINATOR_Z:g}) {100 * kept:.1f}%")
    print("6. multiple testing (true +3% on the primary GMV row): see the issue; the family is")
    print("   now the primary metrics x arms only (engine.family_of)")
    print("5. numerics, 5,000 units/arm, sd 1, shift 0.02")
    for mean, ref, raw, shifted in numerics(rng):
        print(f"   mean {mean:g}: scipy p {ref:.6f}, raw sums {raw:.6f}, shifted {shifted:.6f}")


if __name__ == "__main__":
    main()

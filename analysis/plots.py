"""The report's figures, as PNG bytes: forest plot, sequential looks, SRM status.

Figures are drawn on `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend),
so they are safe in worker processes and tests.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

SIGNIFICANT = "#c0392b"
NEUTRAL = "#34495e"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # the callers' tight_layout already fits the text
    return buf.getvalue()


def forest_plot(rows: list[dict], alpha: float) -> bytes:
    """Relative uplift with its CI per metric (panel) and segment (row), days left out.

    Red marks rows significant after the multiplicity correction (p_adjusted < alpha).
    """
    rows = [r for r in rows if not r["segment"].startswith("day=")]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    segments = list(dict.fromkeys(r["segment"] for r in rows))
    ncol = 2
    nrow = max(1, -(-len(metrics) // ncol))
    fig = Figure(figsize=(11, 0.45 * len(segments) * len(arms) * nrow + 1.2 * nrow))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        labels, y = [], 0
        for seg in segments[::-1]:
            for arm in arms[::-1]:
                r = next((r for r in rows if r["metric"] == metric and r["segment"] == seg
                          and r["arm"] == arm), None)
                label = seg if len(arms) == 1 else f"{seg} · {arm}"
                labels.append(label)
                if r is not None and r["rel_effect"] is not None and r["ci_low"] is not None:
                    sig = r["p_adjusted"] is not None and r["p_adjusted"] < alpha
                    color = SIGNIFICANT if sig else NEUTRAL
                    mid = 100 * r["rel_effect"]
                    err = [[mid - 100 * r["ci_low"]], [100 * r["ci_high"] - mid]]
                    ax.errorbar(mid, y, xerr=err, fmt="o", color=color, capsize=3, ms=4)
                y += 1
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("relative uplift, % (CI)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Uplift vs control by metric and segment (red: adjusted p < {alpha:g})",
                 fontsize=11)
    fig.tight_layout()
    return _png(fig)


def replicate_plot(rows: list[dict]) -> bytes:
    """Each training replicate's relative effect (users-only CI) beside the replicate-aware
    estimate and CI, per confirmatory metric on all users: how far training moves the effect."""
    rows = [r for r in rows if r["segment"] == "all" and r["per_replicate"]
            and not r["exploratory"]]
    fig = Figure(figsize=(9, 0.55 * sum(len(r["per_replicate"]) + 1 for r in rows) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    labels, y = [], 0
    for r in rows[::-1]:  # top to bottom: the pooled estimate, then its replicates
        for p in r["per_replicate"][::-1]:
            if p["rel_effect"] is not None:
                mid = 100 * p["rel_effect"]
                ax.errorbar(mid, y, xerr=[[mid - 100 * p["rel_ci_low"]],
                                          [100 * p["rel_ci_high"] - mid]],
                            fmt="o", color=NEUTRAL, capsize=3, ms=4)
            labels.append(f"  replicate {p['replicate']}")
            y += 1
        if r["rel_effect"] is not None and r["ci_low"] is not None:
            mid = 100 * r["rel_effect"]
            ax.errorbar(mid, y, xerr=[[mid - 100 * r["ci_low"]], [100 * r["ci_high"] - mid]],
                        fmt="D", color=SIGNIFICANT, capsize=3, ms=5)
        labels.append(f"{r['metric']} · {r['arm']}: over replicates")
        y += 1
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("relative uplift, % (replicates: users-only CI; diamond: CI over replicates)",
                  fontsize=8)
    fig.suptitle("Training replicates: each replicate's effect vs the pooled control", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def sequential_plot(sequential: list[dict], alpha: float) -> bytes:
    """Per metric: cumulative uplift by day with fixed and always-valid CIs, and the
    always-valid p-value next to the fixed-horizon one."""
    n = max(1, len(sequential))
    fig = Figure(figsize=(11, 2.4 * n))
    for i, s in enumerate(sequential):
        days = np.asarray(s["day"])
        ax = fig.add_subplot(n, 2, 2 * i + 1)
        rel = _arr(s["rel_effect"]) * 100
        ax.fill_between(days, _arr(s["ci_low_always_valid"]) * 100,
                        _arr(s["ci_high_always_valid"]) * 100, color="#aed6f1",
                        label="always-valid CI")
        ax.plot(days, _arr(s["ci_low_fixed"]) * 100, color="#5d6d7e", ls=":", lw=1,
                label="fixed-horizon CI")
        ax.plot(days, _arr(s["ci_high_fixed"]) * 100, color="#5d6d7e", ls=":", lw=1)
        ax.plot(days, rel, color=NEUTRAL, marker="o", ms=3, label="cumulative uplift")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{s['metric']} ({s['arm']}, {s['method']})", fontsize=9)
        ax.set_ylabel("uplift, %", fontsize=8)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
        ax2 = fig.add_subplot(n, 2, 2 * i + 2)
        ax2.semilogy(days, np.clip(_arr(s["p_value_always_valid"]), 1e-12, 1), marker="o", ms=3,
                     color=NEUTRAL, label="always-valid p (mSPRT)")
        ax2.semilogy(days, np.clip(_arr(s["p_value_fixed"]), 1e-12, 1), ls=":", color="#5d6d7e",
                     label="fixed-horizon p")
        ax2.axhline(alpha, color=SIGNIFICANT, lw=0.8, ls="--", label=f"α = {alpha:g}")
        ax2.set_ylim(top=1.5)
        ax2.yaxis.set_major_locator(LogLocator(numticks=6))
        # plain-text labels: the default log labels are mathtext, slow to lay out
        ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.tick_params(labelsize=8)
        if i == 0:
            ax2.legend(fontsize=7, loc="lower left")
    for ax in fig.axes[-2:]:
        ax.set_xlabel("day (cumulative data)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def srm_plot(srm: dict) -> bytes:
    """Observed vs expected units per arm, titled with the SRM verdict."""
    arms = list(srm["expected_counts"])
    x = np.arange(len(arms))
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [srm["expected_counts"][a] for a in arms], 0.4, color="#aed6f1",
           label="expected")
    color = SIGNIFICANT if srm["mismatch"] else NEUTRAL
    ax.bar(x + 0.2, [srm["observed_counts"][a] for a in arms], 0.4, color=color, label="observed")
    ax.set_xticks(x, arms)
    ax.set_ylabel("units")
    verdict = "SAMPLE RATIO MISMATCH" if srm["mismatch"] else "no sample ratio mismatch"
    ax.set_title(f"{verdict} (χ² p = {srm['p_value']:.3g})", color=color, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _arr(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

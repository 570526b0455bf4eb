"""The report: one document model rendered twice, as Markdown and as self-contained HTML.

Order matters: the sample-ratio check comes first (a mismatch voids everything below it),
then power (is the run able to see the effect it is looking for?), then the results.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from analysis.engine import Analysis


@dataclass(frozen=True)
class Block:
    """A piece of the document: heading, paragraph, alert, table or image."""

    kind: str  # "h2" | "h3" | "p" | "alert" | "ok" | "table" | "img" | "list"
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    items: tuple[str, ...] = ()


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "<1e-4" if x < 1e-4 else f"{x:.4f}"


def _ci(lo: float | None, hi: float | None, fmt) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _result_table(rows: list[dict], alpha: float, with_segment: bool) -> Block:
    header = (("segment",) if with_segment else ()) + (
        "metric", "arm", "family", "control", "treatment", "uplift", "CI", "abs. effect",
        "abs. CI", "CI level", "p", "p adj.", "n (c / t)", "method")
    body = []
    for r in rows:
        sig = r["p_adjusted"] is not None and r["p_adjusted"] < alpha
        body.append(((r["segment"],) if with_segment else ()) + (
            r["metric"] + (" **" if sig else "") + (" ⚠" if r["warning"] else ""), r["arm"],
            r["family"], _num(r["control_mean"]),
            _num(r["treatment_mean"]), _pct(r["rel_effect"]),
            _ci(r["ci_low"], r["ci_high"], _pct), _num(r["abs_effect"]),
            _ci(r["abs_ci_low"], r["abs_ci_high"], _num), f"{100 * r['ci_level']:.4g}%",
            _p(r["p_value"]), _p(r["p_adjusted"]),
            f"{r['n_control']} / {r['n_treatment']}", r["method"]))
    return Block("table", header=header, rows=tuple(body))


def _warning_list(rows: list[dict]) -> list[Block]:
    items = tuple(f"{r['metric']} / {r['segment']} / {r['arm']}: {r['warning']}"
                  for r in rows if r["warning"])
    return [Block("p", "⚠ Warnings:"), Block("list", items=items)] if items else []


def _replicate_blocks(d: dict, plots: bool) -> list[Block]:
    """How much of each confirmatory interval is training noise, and what would settle it."""
    counts = d.get("replicates") or {}
    if counts and max(counts.values()) <= 1:
        return [Block("alert", "One training replicate per arm: every CI above covers the "
                               "users' randomness given the two trained stacks, not the "
                               "randomness of training them; a retrained stack is another "
                               "draw. Give the arms `replicates: R` (R >= 3) to cover it.")]
    out = [Block("h3", "Training replicates"),
           Block("p", "Replicates per arm: " + ", ".join(f"`{a}` {r}" for a, r in counts.items())
                 + ". Effects, CIs and p-values of these rows are over replicates: each arm's "
                   "estimate is the mean of its replicate cells, its variance the spread of "
                   "the cells (users and training together), Welch-Satterthwaite degrees of "
                   "freedom; `user_se` in results.json is the users-only SE of the same "
                   "estimate, `training_sd` the SD one replicate pair's effect has from "
                   "training alone.")]
    items = []
    for s in d.get("replicate_summary", []):
        share = "n/a" if s["training_share"] is None else f"{100 * s['training_share']:.0f}%"
        need = s["replicates_needed"]
        need_text = (f"about {need} replicates per arm would detect a "
                     f"{100 * s['target_uplift']:g}% uplift at these users" if need else
                     f"no number of replicates detects a {100 * s['target_uplift']:g}% uplift "
                     f"at these users (more users are needed too)")
        items.append(f"`{s['metric']}` ({s['arm']}): {share} of the variance of the effect "
                     f"is training noise (training SD {_num(s['training_sd'])}, users' SE "
                     f"{_num(s['user_se'])}); {need_text}.")
    if items:
        out.append(Block("list", items=tuple(items)))
    if plots and items:
        out.append(Block("img", "replicates"))
    return out


def build_document(analysis: Analysis, plots: bool = True) -> list[Block]:
    """The report as blocks, in reading order."""
    res, d = analysis.results, analysis.details
    alpha = d["alpha"]
    srm = res["srm"]
    doc = [Block("h1", f"A/B analysis: {d['experiment_id']}"),
           Block("p", f"Run `{d['run_dir']}`; control `{d['control']}`, treatment(s) "
                      f"{', '.join(f'`{t}`' for t in d['treatments'])}; α = {alpha:g}; "
                      f"{len(d['days'])} day(s); pre-period for CUPED: "
                      f"{'yes' if d['pre_period'] else 'no (CUPED off)'}.")]

    doc.append(Block("h2", "1. Sample ratio mismatch (SRM) check"))
    if srm["mismatch"]:
        doc.append(Block("alert", f"SAMPLE RATIO MISMATCH: χ² p = {srm['p_value']:.3g} < "
                                  f"{srm['threshold']:g}. The arms' unit counts do not match the "
                                  f"configured allocation, so assignment or logging is broken and "
                                  f"NONE of the results below can be trusted until it is fixed."))
    else:
        doc.append(Block("ok", f"No sample ratio mismatch: χ² = {srm['statistic']:.3g}, "
                               f"p = {srm['p_value']:.3g} (alarm below {srm['threshold']:g})."))
    doc.append(Block("table", header=("arm", "expected share", "expected units", "observed units"),
                     rows=tuple((a, f"{srm['expected_shares'][a]:.4f}",
                                 f"{srm['expected_counts'][a]:.1f}", str(srm["observed_counts"][a]))
                                for a in srm["expected_shares"])))
    exposure = srm.get("exposure")
    if exposure:
        text = (f"Exposure SRM (units with at least one impression, per arm, against the same "
                f"shares): χ² = {exposure['statistic']:.3g}, p = {exposure['p_value']:.3g}; "
                f"observed {exposure['observed_counts']}.")
        doc.append(Block("alert", "EXPOSURE SAMPLE RATIO MISMATCH: " + text + " The arms "
                                  "expose different shares of their units: logging or serving "
                                  "is broken for an arm.") if exposure["mismatch"]
                   else Block("ok", text))
    if plots:
        doc.append(Block("img", "srm"))
    health = d.get("health") or {}
    doc.append(Block("h2", "Health of the slates"))
    if health.get("arms"):
        doc.append(Block("table", header=("arm", "requests", "mean slate", "short slates",
                                          "cold-item share", "distinct items"),
                         rows=tuple((a, str(h["requests"]), _num(h["mean_slate"]),
                                     _pct(h["short_slate_share"]).lstrip("+"),
                                     _pct(h["cold_item_share"]).lstrip("+"),
                                     "n/a" if h["distinct_items"] is None
                                     else str(h["distinct_items"]))
                                    for a, h in health["arms"].items())))
        doc.append(Block("p", "From the impressions. Beam coverage is not in the events (see the "
                              "stacks' `stack.json`)."))
    else:
        doc.append(Block("p", health.get("note", "No impressions: no slate health.")))
    for w in health.get("warnings", []):
        doc.append(Block("alert", f"DEGENERATE STACK? {w}"))
    if d.get("not_applicable"):
        doc.append(Block("p", "Not applicable to this run (their events are absent; not an "
                              "alarm): " + "; ".join(f"`{x['metric']}`: {x['reason']}"
                                                    for x in d["not_applicable"]) + "."))
    if d.get("duplicates"):
        doc.append(Block("p", "Each test is counted once; dropped as duplicates: " + ", ".join(
            f"`{x['metric']}@{x['segment']}` (= `{x['same_as']}`)" for x in d["duplicates"])
            + "."))

    untested = [s for s in d["skipped"] if s["segment"] == "all"]
    if untested:
        doc.append(Block("alert", "NOT TESTED on all users: " + "; ".join(
            f"{s['metric']} ({s['arm']}): {s['reason']}" for s in untested)
            + ". These metrics have no result rows; check that the arms can produce them."))
    doc.append(Block("h2", "2. Power: minimum detectable effects of the primary metrics"))
    doc.append(Block("p", f"MDE = smallest true effect this run detects with {100 * d['power']:g}% "
                          f"power at α = {alpha:g} (two-sided), given its units, allocation and "
                          f"duration; target uplift {100 * d['target_uplift']:g}%."))
    items = []
    for p in d["power_analysis"]:
        head = (f"`{p['metric']}` ({p['arm']}, {p['method']}): MDE {_num(p['mde_abs'])} absolute, "
                f"{_pct(p['mde_rel']).lstrip('+')} relative.")
        if p["underpowered"]:
            ratio = (p["units_needed_for_target"] or float("inf")) / max(p["units"], 1)
            items.append(f"{head} UNDERPOWERED: the run cannot reliably detect a "
                         f"{100 * p['target_uplift']:g}% uplift (power "
                         f"{_pct(p['power_at_target']).lstrip('+')}); that needs about "
                         f"{_num(p['units_needed_for_target'], 3)} units in these arms "
                         f"({ratio:.1f}× this run) at the same allocation.")
        else:
            items.append(f"{head} Powered for a {100 * p['target_uplift']:g}% uplift (power "
                         f"{_pct(p['power_at_target']).lstrip('+')}).")
    doc.append(Block("list", items=tuple(items) or ("no primary metric analysed",)))

    rows = res["rows"]
    overall = [r for r in rows if r["segment"] == "all"]
    cohorts = [r for r in rows
               if r["segment"] != "all" and not r["segment"].startswith("day=")]
    daily = [r for r in rows if r["segment"].startswith("day=")]
    doc.append(Block("h2", "3. Results: all users"))
    correction = "Holm" if d["correction"] == "holm" else "Benjamini-Hochberg"
    fams = {f["family"]: f for f in d.get("families", [])}

    def fam_text(name: str) -> str:
        f = fams.get(name)
        return (f"`{name}`: {f['rows']} row(s), {f['significant']} significant, CIs at "
                f"{100 * f['ci_level']:.4g}%" if f else f"`{name}`: no rows")

    doc.append(Block("p", f"Uplift = (treatment − control) / |control| (positive: treatment "
                          f"higher, also for a negative control). `**` marks adjusted p < "
                          f"{alpha:g}, {correction} within each family: the confirmatory "
                          f"family is the primary metrics × treatment arms ("
                          f"{fam_text('primary')}); secondary ({fam_text('secondary')}) and "
                          f"guardrail ({fam_text('guardrail')}) metrics are families of their "
                          f"own. CIs are shown at the level their family's adjusted decision "
                          f"implies (column CI level), so a CI excludes 0 exactly when the "
                          f"row is significant. CUPED rows show unadjusted means and the "
                          f"covariate-adjusted effect. A relative CI of n/a: an arm is constant, "
                          f"the control mean (or a ratio's denominator) is not clearly away "
                          f"from 0; read the absolute CI and p."))
    doc.append(_result_table(overall, alpha, with_segment=False))
    doc.extend(_warning_list(overall))
    for g in d.get("guardrails", []):
        text = (f"Guardrail `{g['metric']}` ({g['arm']}): {g['verdict']} at a margin of "
                f"{100 * g['margin']:g}% ({'higher' if g['higher_is_better'] else 'lower'} is "
                f"better; relative CI {_ci(g['ci_low'], g['ci_high'], _pct)} at "
                f"{100 * g['ci_level']:.4g}%).")
        doc.append(Block("ok" if g["verdict"] == "non-inferior" else "alert", text))
    doc.extend(_replicate_blocks(d, plots))
    if plots:
        doc.append(Block("img", "forest"))
    doc.append(Block("h2", "4. Segments (cohorts): exploratory"))
    doc.append(Block("p", f"EXPLORATORY: segment rows are not part of the confirmatory family; "
                          f"their p adj. is {correction} within the segment rows only "
                          f"({fam_text('exploratory: segments')}). Use them to form hypotheses, "
                          f"not to decide."))
    doc.append(_result_table(cohorts, alpha, with_segment=True) if cohorts
               else Block("p", "No cohort columns in this run."))
    doc.extend(_warning_list(cohorts))
    doc.append(Block("h2", "5. By day (that day's events): exploratory"))
    doc.append(Block("p", f"EXPLORATORY: days are subsets of `all` and depend on each other; "
                          f"their p adj. is {correction} within the day rows only "
                          f"({fam_text('exploratory: days')})."))
    doc.append(_result_table(daily, alpha, with_segment=True))
    doc.extend(_warning_list(daily))

    doc.append(Block("h2", "6. Sequential looks: always-valid p-values (mSPRT)"))
    seq_state = d.get("sequential_state", {})
    doc.append(Block("p", "Cumulative effect at the end of each day. The always-valid p-value and "
                          "CI (mixture SPRT) stay valid however often you look, because the "
                          "mixture variance τ² is fixed once: at the first analysis of the run, "
                          f"from its planned horizon of {seq_state.get('planned_days', '?')} "
                          f"day(s) ({seq_state.get('horizon_source', '?')}), kept in "
                          "`analysis_state.json` beside this report and reused by every "
                          "re-analysis into this folder (deleting it restarts the looks). The "
                          "absolute scale is tested as the average effect per elapsed day (the "
                          "users are a fixed population whose cumulative sums grow). Looks with "
                          "an undefined variance add no evidence. The fixed-horizon p-value is "
                          "valid only at the planned end."))
    for s in d["sequential"]:
        doc.append(Block("h3", f"{s['metric']} ({s['arm']}, {s['method']})"))
        doc.append(Block("table", header=("day", "uplift", "always-valid CI", "always-valid p",
                                          "fixed p", "MDE (rel.)"),
                         rows=tuple((str(day), _pct(s["rel_effect"][i]),
                                     _ci(s["ci_low_always_valid"][i], s["ci_high_always_valid"][i],
                                         _pct),
                                     _p(s["p_value_always_valid"][i]), _p(s["p_value_fixed"][i]),
                                     _pct(s["mde_rel"][i]).lstrip("+"))
                                    for i, day in enumerate(s["day"]))))
    if plots and d["sequential"]:
        doc.append(Block("img", "sequential"))

    doc.append(Block("h2", "7. Method notes"))
    notes = [
        "Per-user sums are computed in DuckDB over the run's Parquet; users assigned but without "
        "events count as zeros; event values are checked (NULL, NaN, inf stop the analysis). "
        "Moments are summed about a pooled shift (no cancellation at large means). Means: Welch "
        "t-test; ratios: delta method; relative uplift = effect / |control| with Fieller's CI "
        "(agrees with the absolute test; undefined when the control mean is not significantly "
        f"away from 0; ratio rows whose denominator mean is within {_num(5.0)} standard errors "
        "of 0 get a warning and no relative CI); CUPED: regression on the same metric over the "
        "pre-period (`<experiment>__pre`), θ pooled within arms.",
        f"Multiplicity: {d['correction']} within each family (primary, secondary, guardrail on "
        "all users: confirmatory; segments, days: exploratory), CIs at each family's decision "
        "level.",
        "Heavy tails: GMV per user is not winsorized by default; measured A/A rate of Welch at "
        "200 vs 5,000 units with heavy-tailed spend: ~8% (winsorized at the pooled 99.9% "
        "quantile ~7.5%), 4.8-5.1% for balanced arms. Prefer balanced arms or --bootstrap.",
        "The intervals cover the randomness of the users given each arm's deployed models, not "
        "the randomness of training them: a model retrained with another seed is another "
        "treatment, so judge a modelling change over several training seeds.",
    ]
    if d["cuped"]:
        vr = [c["variance_reduction"] for c in d["cuped"] if c["segment"] == "all"]
        if vr:
            notes.append("CUPED variance reduction (segment all): " + ", ".join(
                f"{c['metric']} {100 * (c['variance_reduction'] or 0):.1f}%"
                for c in d["cuped"] if c["segment"] == "all"))
    if d["caps"]:
        notes.append("Capped per-user values (winsorized at the configured quantile): " + ", ".join(
            f"{k} ≤ {_num(v)}" for k, v in d["caps"].items()))
    if d["bootstrap"]["replicates"]:
        dropped = d["bootstrap"].get("dropped_replicates", 0)
        notes.append(f"Bootstrap: {d['bootstrap']['replicates']} Poisson replicates; rows with "
                     f"method `+bootstrap` have percentile CIs (p-values stay analytic); "
                     f"{dropped} degenerate replicate(s) (no variance in a sparse cell) dropped"
                     + (": " + ", ".join(f"{x['metric']}/{x['segment']}/{x['arm']} {x['dropped']}"
                                        for x in d["bootstrap"]["dropped"]) if dropped else "")
                     + ".")
    for s in d["skipped"]:
        notes.append(f"Not tested: {s['metric']} / {s['segment']} / {s['arm']}: {s['reason']}.")
    doc.append(Block("list", items=tuple(notes)))
    return doc


def to_markdown(doc: list[Block]) -> str:
    """Render the document as Markdown (images point at `plots/<name>.png`)."""
    out = []
    for b in doc:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind == "h3":
            out.append(f"### {b.text}\n")
        elif b.kind == "p":
            out.append(b.text + "\n")
        elif b.kind == "alert":
            out.append(f"> **🚨 {b.text}**\n")
        elif b.kind == "ok":
            out.append(f"> ✅ {b.text}\n")
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items) + "\n")
        elif b.kind == "table":
            out.append("| " + " | ".join(b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out.extend("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                       for row in b.rows)
            out.append("")
        elif b.kind == "img":
            out.append(f"![{b.text}](plots/{b.text}.png)\n")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f4f4; } td:first-child, th:first-child { text-align: left; }
.alert { background: #c0392b; color: white; padding: 1em; font-size: 1.2em; font-weight: bold; }
.ok { background: #e9f7ef; border-left: 6px solid #27ae60; padding: 0.6em; }
img { max-width: 100%; }
code { background: #f4f6f6; padding: 0 3px; }
"""


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(doc: list[Block], images: dict[str, bytes], title: str) -> str:
    """Render the document as one self-contained HTML page (PNGs embedded as base64)."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_CSS}</style></head><body>"]
    for b in doc:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "alert":
            out.append(f"<div class='alert'>🚨 {_inline(b.text)}</div>")
        elif b.kind == "ok":
            out.append(f"<div class='ok'>✅ {_inline(b.text)}</div>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                           for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img" and b.text in images:
            data = base64.b64encode(images[b.text]).decode("ascii")
            out.append(f"<p><img alt='{b.text}' src='data:image/png;base64,{data}'></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(analysis: Analysis, out: Path, plots: bool = True) -> None:
    """Write `report.md`, `report.html` and `plots/*.png` into `out` (a staging folder)."""
    from analysis.plots import forest_plot, replicate_plot, sequential_plot, srm_plot

    alpha = analysis.details["alpha"]
    images: dict[str, bytes] = {}
    if plots:
        images["srm"] = srm_plot(analysis.results["srm"])
        images["forest"] = forest_plot(analysis.results["rows"], alpha)
        if analysis.details.get("replicate_summary"):
            images["replicates"] = replicate_plot(analysis.results["rows"])
        primary = {m["name"] for m in analysis.details["metrics"] if m["primary"]}
        looks = [s for s in analysis.details["sequential"] if s["metric"] in primary] \
            or analysis.details["sequential"]
        if looks:
            images["sequential"] = sequential_plot(looks, alpha)
        (out / "plots").mkdir(exist_ok=True)
        for name, png in images.items():
            (out / "plots" / f"{name}.png").write_bytes(png)
    doc = build_document(analysis, plots=plots)
    (out / "report.md").write_text(to_markdown(doc))
    (out / "report.html").write_text(
        to_html(doc, images, f"A/B analysis: {analysis.details['experiment_id']}"))

"""Off-policy estimates of a target slate policy's value from logs that carry the logging
policy's propensities (`quasid ope`).

Data: logged slots (request i, position k, shown item a_ik, its logging propensity
p_ik = P_log(a_ik at k | request), rewards r_ik: click, order) and the target policy's item
b_ik at the same request and position (a deterministic policy: an arm's or a saved stack's
slates for the logged requests). The estimand is the target's value per impression,
V = E_i[(1/K_i) Σ_k E[r | request i, item b_ik at k]] (its CTR, its order rate), under the
position-based assumption that a slot's reward depends on its own item and position only
(as in the simulator's response model). With w_ik = [a_ik = b_ik] / p_ik:

- IPS: V̂ = mean_i (1/K_i) Σ_k w_ik r_ik (unbiased when p > 0 wherever the target goes);
- SNIPS (self-normalized, per position): V̂ = (1/K) Σ_k Σ_i w_ik r_ik / Σ_i w_ik;
- DR: V̂ = mean_i (1/K_i) Σ_k [q̂(b_ik, k) + w_ik (r_ik − q̂(a_ik, k))], with q̂(a, k) =
  θ_k·φ_a (position rate × shrunk item factor) fitted on the other half of the requests
  (2-fold cross-fitting by request hash), so a wrong q̂ costs variance, not bias;
- replay (Li et al., 2011; uniformly random logging only): the mean reward of the logged
  slots whose item is the target's, V̂ = Σ m_ik r_ik / Σ m_ik (per-slot replay of slates).

CIs: normal, from the per-request influence values (IPS, DR: the per-request terms; SNIPS
and replay: delta method of their ratios), z_{1−α/2}·sd/√n.

Where the logging was uniformly random this is also a check of the simulator: a stack's
CTR estimated off-policy from real randomized logs against its simulated online CTR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from scipy import stats as sps

from analysis.store import AnalysisError, Manifest, events_source
from quasid.core.hashing import mix64

ESTIMATORS = ("ips", "snips", "dr", "replay")
SHRINK = 20.0  # pseudo-impressions of the item factor's prior (φ = 1)


@dataclass(frozen=True)
class Slots:
    """Logged slots, one entry per impression, with the target's item at that slot."""

    request: np.ndarray     # (n,) int64
    position: np.ndarray    # (n,) int
    item: np.ndarray        # (n,) int64, logged item
    propensity: np.ndarray  # (n,) float, P_log(item at position | request)
    target: np.ndarray      # (n,) int64, the target's item at (request, position)
    rewards: dict[str, np.ndarray]  # name -> (n,) float


def _groups(request: np.ndarray) -> tuple[np.ndarray, int]:
    _, inv = np.unique(request, return_inverse=True)
    return inv, int(inv.max()) + 1 if inv.size else 0


def _per_request(values: np.ndarray, inv: np.ndarray, n_req: int) -> np.ndarray:
    return np.bincount(inv, weights=values, minlength=n_req)


def _ci(value: float, influence: np.ndarray, alpha: float) -> tuple[float, float, float]:
    n = influence.size
    se = float(np.std(influence, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    z = float(sps.norm.ppf(1 - alpha / 2))
    return se, value - z * se, value + z * se


def _reward_model(slots: Slots, r: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, dict]:
    """q̂(a, k) = θ_k φ_a from the slots in `fit`: θ_k the mean reward at position k,
    φ_a = (Σ r_a + SHRINK) / (Σ θ_k over a's impressions + SHRINK)."""
    pos = slots.position
    n_pos = int(pos.max()) + 1
    cnt = np.bincount(pos[fit], minlength=n_pos).astype(float)
    theta = np.divide(np.bincount(pos[fit], weights=r[fit], minlength=n_pos), cnt,
                      out=np.zeros(n_pos), where=cnt > 0)
    items = np.unique(np.concatenate([slots.item, slots.target]))
    ia = np.searchsorted(items, slots.item)
    num = np.bincount(ia[fit], weights=r[fit], minlength=len(items))
    den = np.bincount(ia[fit], weights=theta[pos[fit]], minlength=len(items))
    phi = (num + SHRINK * max(theta.mean(), 1e-12)) / (den + SHRINK * max(theta.mean(), 1e-12))
    return theta, {"items": items, "phi": phi}


def _q(theta: np.ndarray, model: dict, items: np.ndarray, pos: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(model["items"], items)
    return theta[pos] * model["phi"][idx]


def estimate(slots: Slots, alpha: float = 0.05, uniform: bool | None = None) -> dict:
    """IPS, SNIPS, DR and (uniform logging) replay estimates of each reward's value per
    impression under the target, with CIs; `uniform` None: detected (one propensity)."""
    p = np.asarray(slots.propensity, dtype=np.float64)
    if p.size == 0:
        raise AnalysisError("ope: no logged impressions")
    if not np.all((p > 0) & (p <= 1) & np.isfinite(p)):
        raise AnalysisError("ope: propensities must be in (0, 1] for every impression")
    if uniform is None:
        uniform = bool(p.max() <= p.min() * (1 + 1e-9))
    match = (slots.item == slots.target).astype(np.float64)
    w = match / p
    inv, n_req = _groups(slots.request)
    k_req = np.bincount(inv, minlength=n_req).astype(np.float64)
    per_slot = 1.0 / k_req[inv]  # the 1/K_i of each slot
    fold = (mix64(np.asarray(slots.request).astype(np.uint64)) & np.uint64(1)) == 0
    pos = slots.position.astype(np.int64)
    n_pos = int(pos.max()) + 1
    out: dict[str, list[dict]] = {}
    for name, r in slots.rewards.items():
        r = np.asarray(r, dtype=np.float64)
        rows = []
        # IPS
        g = _per_request(per_slot * w * r, inv, n_req)
        v = float(g.mean())
        rows.append(("ips", v, g))
        # SNIPS per position
        sw = np.bincount(pos, weights=w, minlength=n_pos)
        swr = np.bincount(pos, weights=w * r, minlength=n_pos)
        ok = sw > 0
        vk = np.divide(swr, sw, out=np.zeros(n_pos), where=ok)
        v = float(vk[ok].mean()) if ok.any() else float("nan")
        mean_w = sw / n_req
        infl_slot = np.where(ok[pos], w * (r - vk[pos]) / np.where(ok[pos], mean_w[pos], 1.0), 0.0)
        g = _per_request(infl_slot / max(int(ok.sum()), 1), inv, n_req)
        rows.append(("snips", v, v + g - g.mean()))
        # DR, 2-fold cross-fitted reward model
        q_log, q_tgt = np.zeros_like(r), np.zeros_like(r)
        for f in (True, False):
            theta, model = _reward_model(slots, r, fold != f)
            sel = fold == f
            q_log[sel] = _q(theta, model, slots.item[sel], pos[sel])
            q_tgt[sel] = _q(theta, model, slots.target[sel], pos[sel])
        g = _per_request(per_slot * (q_tgt + w * (r - q_log)), inv, n_req)
        rows.append(("dr", float(g.mean()), g))
        # replay: uniformly random logging only
        if uniform and match.sum() > 0:
            m = match
            v = float((m * r).sum() / m.sum())
            g = _per_request(m * (r - v), inv, n_req) / (m.sum() / n_req)
            rows.append(("replay", v, v + g))
        res = []
        for est, value, infl in rows:
            se, lo, hi = _ci(value, infl, alpha)
            res.append({"estimator": est, "value": value, "se": se, "ci_low": lo,
                        "ci_high": hi, "n": int(n_req), "matched_slots": int(match.sum())})
        out[name] = res
    return {"estimates": out, "uniform_logging": uniform, "alpha": alpha,
            "requests": int(n_req), "impressions": int(p.size)}


def estimate_run(run_dir: str | Path, target: str | Path, *, arm: str | None = None,
                 alpha: float = 0.05, uniform: bool | None = None,
                 propensity: str = "propensity") -> dict:
    """OPE on a run directory's events (impressions with a `propensity` column; clicks and
    orders as events of the same request and item) for the target slates in `target`
    (Parquet or CSV: request_id, position, item_id)."""
    run_dir, target = Path(run_dir).resolve(), Path(target)
    manifest = Manifest.load(run_dir)
    if not target.is_file():
        raise AnalysisError(f"{target}: file not found (expected the target's slates: "
                            f"request_id, position, item_id)")
    reader = ("read_csv_auto" if target.suffix.lower() == ".csv" else "read_parquet")
    src = events_source(run_dir)
    exp = manifest.experiment_id.replace("'", "''")
    con = duckdb.connect()
    try:
        cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        need = ["request_id", "position", "item_id", "event_type", propensity]
        missing = [c for c in need if c not in cols]
        if missing:
            raise AnalysisError(f"{run_dir / 'events'}: missing column(s) {missing} for OPE "
                                f"(expected impressions with the logging propensity: "
                                f"import-logs --propensity COL)")
        tcols = {r[0] for r in con.execute(
            f"DESCRIBE SELECT * FROM {reader}('{target}')").fetchall()}
        if not {"request_id", "position", "item_id"} <= tcols:
            raise AnalysisError(f"{target}: columns {sorted(tcols)}; expected request_id, "
                                f"position, item_id")
        arm_sql = "" if arm is None else f" AND arm = '{arm.replace(chr(39), chr(39) * 2)}'"
        rows = con.execute(f"""
            WITH ev AS (SELECT * FROM {src} WHERE experiment_id = '{exp}'{arm_sql}),
            imp AS (SELECT request_id, position, item_id, {propensity} AS p FROM ev
                    WHERE event_type = 'impression'),
            rew AS (SELECT request_id, item_id,
                           count(*) FILTER (WHERE event_type = 'click') AS click,
                           count(*) FILTER (WHERE event_type = 'order') AS orders
                    FROM ev GROUP BY ALL)
            SELECT i.request_id, i.position, i.item_id, i.p, t.item_id,
                   COALESCE(r.click, 0), COALESCE(r.orders, 0)
            FROM imp i
            LEFT JOIN {reader}('{target}') t
                   ON t.request_id = i.request_id AND t.position = i.position
            LEFT JOIN rew r ON r.request_id = i.request_id AND r.item_id = i.item_id
            ORDER BY i.request_id, i.position""").fetchall()
    finally:
        con.close()
    if not rows:
        raise AnalysisError(f"{run_dir / 'events'}: no impressions"
                            + (f" in arm {arm!r}" if arm else ""))
    a = np.array(rows, dtype=object)
    if any(x is None for x in a[:, 4]):
        n = sum(x is None for x in a[:, 4])
        raise AnalysisError(f"{target}: no target item for {n} logged slot(s) (expected the "
                            f"target's slate for every logged request and position)")
    slots = Slots(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
                  a[:, 3].astype(np.float64), a[:, 4].astype(np.int64),
                  {"ctr": (a[:, 5] > 0).astype(np.float64),
                   "order_rate": (a[:, 6] > 0).astype(np.float64)})
    result = estimate(slots, alpha=alpha, uniform=uniform)
    result.update({"experiment_id": manifest.experiment_id, "arm": arm,
                   "target": target.name})
    return result

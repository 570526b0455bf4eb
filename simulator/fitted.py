"""A world fitted on logs, for data without a known truth (Amazon), and how it is calibrated.

Preference model: BPR matrix factorisation (Rendle et al. 2009) with an item bias,
s(u, i) = <p_u, q_i> + b_i, fitted with torch (seeded) on ALL logged interactions, the
experiment window, held-out and cold items included: the world knows how users respond
to every item, including the ones no stack was trained on. It is a different model
family from the SID stacks under test (no SIDs, no content, no sequence), so no arm is
favoured by construction. BPR's score difference is a log-odds of preferring one item to
another, so s sits on a logit scale up to the calibration below.

Response model (the same form as the synthetic truth's, `quasid.data.world`):
    p(click | u, i, position k) = (k + 1)^-eta * sigmoid(alpha * <p_u, q_i> + alpha_b * b_i + beta)
    p(order | click) = sigmoid(beta_o + gamma_s * s(u, i) + gamma_p * log(price_i / ref_i))
with ref_i the median price of the item's category; cancels at a fixed rate; quantity =
1 + Poisson(quantity_extra). The personal part and the item bias get separate scales
because logged popularity mixes appeal with exposure (the logging system showed popular
items more), which the randomised impressions below tell apart.

Calibration (documented in the manifest's `world.calibration`):
- source `impressions` (logs with impressions and clicks): (alpha, alpha_b, beta, eta) by
  maximum likelihood on the logged impressions, then beta shifted (root finding) so the
  expected clicks equal the logged clicks exactly; cancel rate and quantity from the logged orders.
  A synthetic dataset has no impression logs of its own, so they are drawn from its true
  world under a uniformly random logging policy over the `log_days` before the window
  (the randomised traffic a team would log to measure position bias).
- source `targets` (no impressions, e.g. Amazon): alpha = alpha_b = `score_scale`, eta =
  `position_decay`, and beta solved so the mean p(click) over the `reference` stack's
  slates on (a sample of) the window's requests equals `ctr`; these are assumptions.
- the order model: a logistic regression (statsmodels) of "the logged interaction is an
  order" on (s, log relative price) when the logs mark orders (`order_event`), which
  reproduces the logged order rate per interaction exactly (the intercept's score
  equation); otherwise gamma_s = 0, gamma_p = `order_price_slope` and beta_o solved so the
  mean p(order | click) over the logged interactions equals `order_rate`.

Measured on the synthetic world (expected CTR of the window's requests, fitted / true;
the stated tolerance of tests/simulator/test_fitted.py is 15%): default world (20,000
users) popularity slates 0.976, random slates 1.006, conversion 0.355 vs 0.367 true;
small test world (1,500 users) 0.919 and 0.982, conversion 0.36 vs 0.48 (the order model
has only 12,700 logged interactions there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy.optimize import brentq, minimize

from quasid.core.hashing import hash_ids, string_key, to_uniform
from quasid.core.io import write_npz_atomic
from simulator.baselines import PopularityRecommender, RandomRecommender
from simulator.config import CalibrationSpec, FitSpec
from simulator.responses import (
    Probabilities,
    TrueWorld,
    check_slates,
    respond,
    sigmoid,
)

MAX_POSITIONS = 200


def fit_bpr(user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int,
            spec: FitSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BPR-MF with item bias on (user row, item row) pairs: (P, Q, b) as float32 arrays.

    Uniform negatives; sparse embeddings with SparseAdam (an update touches only the rows
    of its batch); L2 penalty `reg` on the factors and biases in the batch; a seeded torch
    generator, so the same inputs give the same factors.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small sparse steps: threads only add synchronisation cost
    try:
        return _fit_bpr(user_rows, item_rows, n_users, n_items, spec)
    finally:
        torch.set_num_threads(threads)


def _fit_bpr(user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int,
             spec: FitSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(spec.seed)
    users = torch.as_tensor(np.asarray(user_rows, dtype=np.int64).copy())
    items = torch.as_tensor(np.asarray(item_rows, dtype=np.int64).copy())
    p = torch.nn.Embedding(n_users, spec.dim, sparse=True)
    q = torch.nn.Embedding(n_items, spec.dim, sparse=True)
    b = torch.nn.Embedding(n_items, 1, sparse=True)
    with torch.no_grad():
        p.weight.copy_(0.1 * torch.randn(n_users, spec.dim, generator=gen))
        q.weight.copy_(0.1 * torch.randn(n_items, spec.dim, generator=gen))
        b.weight.zero_()
    opt = torch.optim.SparseAdam([p.weight, q.weight, b.weight], lr=spec.lr)
    n = len(users)
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        negatives = torch.randint(n_items, (n,), generator=gen)
        for start in range(0, n, spec.batch_size):
            sel = perm[start:start + spec.batch_size]
            pu, qi, qj = p(users[sel]), q(items[sel]), q(negatives[sel])
            bi, bj = b(items[sel])[:, 0], b(negatives[sel])[:, 0]
            x = (pu * (qi - qj)).sum(1) + bi - bj
            penalty = (pu.square().sum(1) + qi.square().sum(1) + qj.square().sum(1)
                       + bi.square() + bj.square())
            loss = -torch.nn.functional.logsigmoid(x).mean() + spec.reg * penalty.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (p.weight.detach().numpy().astype(np.float32),
            q.weight.detach().numpy().astype(np.float32),
            b.weight.detach().numpy()[:, 0].astype(np.float32))


@dataclass(frozen=True)
class FittedWorld:
    """A world fitted on logs (see the module docstring); ids map to rows by searchsorted."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    log_rel_price: np.ndarray
    alpha: float  # scale of the personal part <p_u, q_i>
    alpha_bias: float  # scale of the item bias b_i
    beta: float
    eta: float
    order_bias: float
    order_score_slope: float
    order_price_slope: float
    cancel_rate: float
    quantity_extra: float
    report: str = "{}"  # JSON: how it was calibrated, logged vs fitted rates

    name = "fitted"

    def _rows(self, ids: np.ndarray, known: np.ndarray, what: str) -> np.ndarray:
        pos = np.searchsorted(known, ids).clip(max=len(known) - 1)
        bad = known[pos] != ids
        if np.any(bad):
            raise ValueError(f"fitted world: unknown {what} ids "
                             f"{np.unique(np.asarray(ids)[bad])[:5].tolist()}")
        return pos

    def parts(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(<p_u, q_i>, b_i) for aligned (broadcastable) user and item ids."""
        u = self._rows(np.asarray(users), self.user_ids, "user")
        i = self._rows(np.asarray(items), self.item_ids, "item")
        return (np.einsum("...d,...d->...", self.user_factors[u], self.item_factors[i]),
                self.item_bias[i])

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """BPR score s(u, i) = <p_u, q_i> + b_i."""
        personal, bias = self.parts(users, items)
        return personal + bias

    def click_logit(self, personal: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """alpha <p_u, q_i> + alpha_b b_i + beta."""
        return self.alpha * personal + self.alpha_bias * bias + self.beta

    def position_bias(self, k: int) -> np.ndarray:
        """Examination probability of positions 0..k-1: (k + 1)^-eta."""
        return np.arange(1, k + 1, dtype=np.float64) ** -self.eta

    def probabilities(self, users: np.ndarray, items: np.ndarray) -> Probabilities:
        """p(click) and p(order | click) for slates `items` (n, k) of `users` (n,)."""
        check_slates(users, items)
        k = items.shape[1]
        if k > MAX_POSITIONS:
            raise ValueError(f"slate size {k} exceeds {MAX_POSITIONS} positions")
        personal, bias = self.parts(np.asarray(users)[:, None], items)
        s = personal + bias
        click = self.position_bias(k)[None, :] * sigmoid(self.click_logit(personal, bias))
        lrp = self.log_rel_price[self._rows(items, self.item_ids, "item")]
        order = sigmoid(self.order_bias + self.order_score_slope * s
                         + self.order_price_slope * lrp)
        return Probabilities(click, order)

    def describe(self) -> dict:
        """Scalar parameters and the calibration report."""
        scalars = {f.name: getattr(self, f.name) for f in fields(self)
                   if isinstance(getattr(self, f.name), float)}
        return {"kind": "fitted", "model": "BPR-MF with item bias", **scalars,
                "calibration": json.loads(self.report)}

    def save(self, path: str | Path) -> Path:
        """Write an `.npz` whose bytes depend on the parameters only."""
        return write_npz_atomic({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> FittedWorld:
        """Read a world written by `save`."""
        with np.load(path) as data:
            kwargs = {f.name: (data[f.name].item() if data[f.name].ndim == 0 else data[f.name])
                      for f in fields(cls)}
        return cls(**kwargs)


def log_relative_price(items: pl.DataFrame) -> np.ndarray:
    """log(price / median price of the item's category), rows in item_id order."""
    frame = items.sort("item_id").with_columns(
        pl.col("category").fill_null("__none__").alias("_cat"))
    return frame.select(
        (pl.col("price") / pl.col("price").median().over("_cat")).log()
    ).to_series().to_numpy()


def _click_nll(theta: np.ndarray, personal: np.ndarray, bias: np.ndarray, pos: np.ndarray,
               clicked: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of clicks under (k+1)^-eta sigmoid(alpha personal + alpha_b
    bias + beta), and its gradient in (alpha, alpha_b, beta, eta)."""
    alpha, alpha_b, beta, eta = theta
    sig = sigmoid(alpha * personal + alpha_b * bias + beta)
    log_k = np.log1p(pos)
    p = np.clip(np.exp(-eta * log_k) * sig, 1e-12, 1 - 1e-12)
    nll = -np.sum(np.where(clicked, np.log(p), np.log1p(-p)))
    dnll_dp = np.where(clicked, -1.0 / p, 1.0 / (1.0 - p))
    dz = dnll_dp * p * (1.0 - sig)  # dp/dz = p (1 - sigmoid)
    grad = np.array([np.sum(dz * personal), np.sum(dz * bias), np.sum(dz),
                     np.sum(dnll_dp * p * -log_k)])
    return float(nll), grad


def _solve_level(target: float, mean_at: callable, what: str) -> float:
    """The intercept at which `mean_at(intercept)` equals `target` (monotone: brentq)."""
    lo, hi = -30.0, 30.0
    if not mean_at(lo) <= target <= mean_at(hi):
        raise ValueError(f"calibration: cannot reach the target {what} {target:.4g} "
                         f"(reachable {mean_at(lo):.4g} .. {mean_at(hi):.4g})")
    return float(brentq(lambda c: mean_at(c) - target, lo, hi, xtol=1e-10))


def _sample_rows(n: int, limit: int, key: str) -> np.ndarray:
    """A hash-chosen (deterministic) sample of at most `limit` of n rows, in row order."""
    if n <= limit:
        return np.arange(n)
    u = to_uniform(hash_ids(string_key(key), np.arange(n)))
    return np.sort(np.argsort(u, kind="stable")[:limit])


@dataclass(frozen=True)
class CalibrationInputs:
    """What calibration reads: the logs, the catalog, the window's requests and histories."""

    interactions: pl.DataFrame  # user_id, item_id, ts, event (all logs)
    items: pl.DataFrame
    window_users: np.ndarray  # users of the experiment window's requests
    window_histories: np.ndarray  # their histories (padded), for the reference stack
    train_items: np.ndarray  # item ids of the training logs (popularity reference)
    calibration_users: np.ndarray | None  # requests for impression logs (source impressions)
    calibration_histories: np.ndarray | None
    calibration_request_ids: np.ndarray | None
    truth: TrueWorld | None
    slate_size: int
    seed: int


def fit_world(inputs: CalibrationInputs, fit: FitSpec, cal: CalibrationSpec) -> FittedWorld:
    """Fit the preference model on all interactions and calibrate it (module docstring)."""
    inter = inputs.interactions
    user_ids = np.unique(inter["user_id"].to_numpy())
    item_ids = inputs.items.sort("item_id")["item_id"].to_numpy()
    u_rows = np.searchsorted(user_ids, inter["user_id"].to_numpy())
    i_rows = np.searchsorted(item_ids, inter["item_id"].to_numpy())
    p, q, b = fit_bpr(u_rows, i_rows, len(user_ids), len(item_ids), fit)
    lrp = log_relative_price(inputs.items)
    base = FittedWorld(user_ids, item_ids, p, q, b, lrp, alpha=cal.score_scale,
                       alpha_bias=cal.score_scale, beta=0.0,
                       eta=cal.position_decay, order_bias=0.0, order_score_slope=0.0,
                       order_price_slope=cal.order_price_slope, cancel_rate=cal.cancel_rate,
                       quantity_extra=cal.quantity_extra)
    report: dict = {"source": cal.source, "fit": fit.model_dump()}
    if cal.source == "impressions":
        click = _calibrate_clicks_on_impressions(base, inputs, report)
    else:
        click = _calibrate_clicks_on_targets(base, inputs, cal, report)
    order = _calibrate_orders(base, inputs, cal, report)
    values = {**{f.name: getattr(base, f.name) for f in fields(base)}, **click, **order}
    values["report"] = json.dumps(report, sort_keys=True)
    return FittedWorld(**values)


def _calibrate_clicks_on_impressions(base: FittedWorld, inputs: CalibrationInputs,
                                     report: dict) -> dict:
    if inputs.truth is None or inputs.calibration_users is None:
        raise ValueError("calibration source 'impressions' needs impression logs: this dataset "
                         "has no true world to log them from (no world.npz); use "
                         "world.calibration.source: targets")
    k = inputs.slate_size
    logger = RandomRecommender(base.item_ids, seed=inputs.seed)
    slates, _ = logger.recommend(inputs.calibration_histories, k, inputs.calibration_users)
    logged = respond(inputs.truth, inputs.calibration_users, slates,
                     inputs.calibration_request_ids, seed=int(string_key(f"calib{inputs.seed}")))
    personal, bias = (x.ravel() for x in base.parts(inputs.calibration_users[:, None], slates))
    pos = np.broadcast_to(np.arange(k), slates.shape).ravel().astype(np.float64)
    clicked = logged.click.ravel()
    ctr = float(clicked.mean())
    start = np.array([1.0, 1.0, np.log(ctr / (1 - ctr)), 0.5])
    res = minimize(_click_nll, start, args=(personal, bias, pos, clicked), jac=True,
                   method="L-BFGS-B", bounds=[(0.0, 20.0), (0.0, 20.0), (-30.0, 30.0), (0.0, 5.0)])
    alpha, alpha_b, _, eta = (float(x) for x in res.x)
    pb = (1.0 + pos) ** -eta
    z = alpha * personal + alpha_b * bias

    def mean_ctr(c: float) -> float:
        return float(np.mean(pb * sigmoid(z + c)))

    beta = _solve_level(ctr, mean_ctr, "click rate")
    n_orders = int(logged.order.sum())
    out = {"alpha": alpha, "alpha_bias": alpha_b, "beta": beta, "eta": eta}
    if n_orders:
        out["cancel_rate"] = float(logged.cancel.sum() / n_orders)
        out["quantity_extra"] = float(logged.quantity[logged.order].mean() - 1)
    report["impressions"] = {
        "logging_policy": "uniformly random slates, drawn from the true world",
        "requests": int(len(slates)), "impressions": int(clicked.size),
        "clicks": int(clicked.sum()), "orders": n_orders, "logged_ctr": ctr,
        "fitted_ctr": mean_ctr(beta), "mle_converged": bool(res.success),
        "logged_ctr_by_position": [round(float(x), 6) for x in logged.click.mean(0)],
        "fitted_ctr_by_position": [
            round(float(x), 6) for x in (pb * sigmoid(z + beta)).reshape(slates.shape).mean(0)],
    }
    return out


def _calibrate_clicks_on_targets(base: FittedWorld, inputs: CalibrationInputs,
                                 cal: CalibrationSpec, report: dict) -> dict:
    k = inputs.slate_size
    rows = _sample_rows(len(inputs.window_users), cal.sample_requests, "calibration-sample")
    users, hist = inputs.window_users[rows], inputs.window_histories[rows]
    if cal.reference == "popularity":
        ref = PopularityRecommender.fit(base.item_ids, inputs.train_items)
    else:
        ref = RandomRecommender(base.item_ids, seed=inputs.seed)
    slates, _ = ref.recommend(hist, k, users)
    z = cal.score_scale * base.score(users[:, None], slates)
    pb = base.position_bias(k)[None, :]

    def mean_ctr(c: float) -> float:
        return float(np.mean(pb * sigmoid(z + c)))

    beta = _solve_level(cal.ctr, mean_ctr, "click rate")
    report["targets"] = {"ctr": cal.ctr, "reference": cal.reference, "requests": int(len(rows)),
                         "position_decay": cal.position_decay, "score_scale": cal.score_scale,
                         "note": "the logs have no impressions: the click level and position "
                                 "bias are assumptions"}
    return {"beta": beta}


def _calibrate_orders(base: FittedWorld, inputs: CalibrationInputs, cal: CalibrationSpec,
                      report: dict) -> dict:
    inter = inputs.interactions
    rows = _sample_rows(inter.height, 200_000, "order-sample")
    inter = inter[rows]
    s = base.score(inter["user_id"].to_numpy(), inter["item_id"].to_numpy())
    item_rows = np.searchsorted(base.item_ids, inter["item_id"].to_numpy())
    lrp = base.log_rel_price[item_rows]
    is_order = (inter["event"] == cal.order_event).to_numpy()
    events = inter["event"].unique().to_list()
    if is_order.any() and not is_order.all():
        import statsmodels.api as sm

        x = np.column_stack([np.ones(len(s)), s, lrp])
        fit = sm.Logit(is_order.astype(np.float64), x).fit(disp=0)
        b0, bs, bp = (float(v) for v in fit.params)
        predicted = float(np.mean(sigmoid(x @ fit.params)))
        report["orders"] = {"method": f"logistic regression of event == {cal.order_event!r} on "
                                      "(score, log relative price)",
                            "interactions": int(len(s)), "logged_rate": float(is_order.mean()),
                            "fitted_rate": predicted, "coefficients": [b0, bs, bp]}
        return {"order_bias": b0, "order_score_slope": bs, "order_price_slope": bp}

    def mean_rate(c: float) -> float:
        return float(np.mean(sigmoid(c + cal.order_price_slope * lrp)))

    b0 = _solve_level(cal.order_rate, mean_rate, "order rate")
    report["orders"] = {"method": f"assumed: the logs mark no {cal.order_event!r} among "
                                  f"{events}; intercept solved for order_rate",
                        "order_rate": cal.order_rate, "price_slope": cal.order_price_slope}
    return {"order_bias": b0, "order_score_slope": 0.0, "order_price_slope": cal.order_price_slope}

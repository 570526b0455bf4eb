"""The world model: how users respond to a slate, behind one interface.

A world gives, for requests (users) and their slates (items, one column per position):
- p(click) at each position: position bias x the user's preference;
- p(order | click): preference and the user's price sensitivity;
- a cancel rate (a share of orders is cancelled) and the quantity law
  (quantity = 1 + Poisson(quantity_extra)).
`respond` turns these into outcomes with per-request randomness: every uniform is a hash
of (seed, request id, position, stage), so an outcome does not depend on batching or
sharding. Effect injection multiplies one arm's click or order probability by a factor.

Implementations: `TrueWorld` (the synthetic world's ground truth, `quasid.data.world`) and
`simulator.fitted.FittedWorld` (fitted on logs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.special import pdtr

from quasid.core.hashing import hash_ids, mix64, to_uniform
from quasid.data.world import World

STAGES = {"click": 1, "order": 2, "cancel": 3, "quantity": 4}


@dataclass(frozen=True)
class Probabilities:
    """Per (request, position): p(click) and p(order | click)."""

    click: np.ndarray
    order: np.ndarray


@runtime_checkable
class WorldModel(Protocol):
    """Anything that says how likely users are to click and order what they are shown."""

    name: str
    cancel_rate: float
    quantity_extra: float

    def probabilities(self, users: np.ndarray, items: np.ndarray) -> Probabilities:
        """users (n,), items (n, k) slates (column = position) -> (n, k) probabilities."""
        ...

    def describe(self) -> dict:
        """JSON-ready parameters for the manifest."""
        ...


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def check_slates(users: np.ndarray, items: np.ndarray) -> None:
    """users must be (n,) and items (n, k): a clear error instead of silent broadcasting."""
    users, items = np.asarray(users), np.asarray(items)
    if users.ndim != 1 or items.ndim != 2 or len(users) != len(items):
        raise ValueError(f"world: expected users (n,) and slates (n, k), got {users.shape} "
                         f"and {items.shape}")


class TrueWorld:
    """The synthetic world's ground truth (see `quasid.data.world` for the model)."""

    name = "truth"

    def __init__(self, world: World):
        self.world = world
        self.cancel_rate = float(world.cancel_rate)
        self.quantity_extra = float(world.quantity_extra)
        # the item half of World.price_utility, once per item instead of once per slot
        self._log_relative_price = np.log(world.price / world.price_ref)

    def probabilities(self, users: np.ndarray, items: np.ndarray) -> Probabilities:
        """p(click) = position_bias[k] sigmoid(a + click_bias); p(order | click) =
        sigmoid(order_bias + order_slope a + g).

        a and g are `World.affinity` and `World.price_utility` of each user with each slate
        item, bit for bit, computed without gathering the user's taste vector once per slot.
        """
        check_slates(users, items)
        w = self.world
        k = items.shape[1]
        if k > len(w.position_bias):
            raise ValueError(f"slate size {k} exceeds the world's {len(w.position_bias)} positions")
        users = np.asarray(users)
        # np.take along axis 0: ~4x faster than fancy indexing for rows of a 2-d table
        taste = np.take(w.item_taste, items, axis=0)
        a = np.einsum("nd,nkd->nk", np.take(w.user_pref, users, axis=0), taste) + w.item_pop[items]
        g = -w.price_sensitivity[users][:, None] * self._log_relative_price[items]
        click = w.position_bias[:k][None, :] * sigmoid(a + w.click_bias)
        order = sigmoid(w.order_bias + w.order_slope * a + g)
        return Probabilities(click, order)

    def describe(self) -> dict:
        """The truth's scalar parameters."""
        w = self.world
        return {"kind": "truth", "click_bias": float(w.click_bias),
                "order_bias": float(w.order_bias), "order_slope": float(w.order_slope),
                "cancel_rate": self.cancel_rate, "quantity_extra": self.quantity_extra,
                "position_bias": [round(float(x), 6) for x in w.position_bias[:10]]}


@dataclass(frozen=True)
class Responses:
    """Outcomes per (request, position); quantity is 0 where there is no order."""

    click: np.ndarray
    order: np.ndarray
    cancel: np.ndarray
    quantity: np.ndarray


def request_keys(seed: int, request_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per request: the root of all of its randomness."""
    return hash_ids(np.uint64(seed), np.asarray(request_ids, dtype=np.int64))


def _stage_salt(k: int, stage: str) -> np.ndarray:
    return mix64(np.uint64(STAGES[stage] << 32) + np.arange(k, dtype=np.uint64))


def stage_uniforms(keys: np.ndarray, k: int, stage: str) -> np.ndarray:
    """(n, k) uniforms for one stage, a pure function of (request key, position, stage)."""
    return to_uniform(mix64(keys[:, None] ^ _stage_salt(k, stage)[None, :]))


def stage_uniforms_at(keys: np.ndarray, rows: np.ndarray, positions: np.ndarray, k: int,
                      stage: str) -> np.ndarray:
    """`stage_uniforms(keys, k, stage)[rows, positions]`, computed at those cells only."""
    return to_uniform(mix64(keys[rows] ^ _stage_salt(k, stage)[positions]))


@lru_cache(maxsize=16)
def _poisson_cdf(mu: float) -> np.ndarray:
    """F(j) = P(Poisson(mu) <= j) for j = 0, 1, ... up to where F rounds to 1."""
    n = int(mu + 40 * np.sqrt(mu) + 64)  # F is 1 in float64 long before 40 sd above mu
    cdf = pdtr(np.arange(n), mu)
    while cdf[-1] < 1.0:  # not reached for any mu tried; kept so the table is always whole
        n *= 2
        cdf = pdtr(np.arange(n), mu)
    cdf.setflags(write=False)
    return cdf


def poisson_quantile(u: np.ndarray, mu: float) -> np.ndarray:
    """Inverse CDF of Poisson(mu) at uniforms u in [0, 1): the smallest j with F(j) >= u.

    A binary search in a table of F (a few dozen entries for small mu), instead of
    `scipy.stats.poisson.ppf`'s per-value root finding (~100x slower); both give the same
    integer except at u within one float step of an F(j), where scipy's root can land on
    the wrong side.
    """
    if not mu >= 0 or not np.isfinite(mu):
        raise ValueError(f"poisson_quantile: mean {mu!r} must be a finite number >= 0")
    if mu == 0:
        return np.zeros(np.shape(u), dtype=np.int64)
    return np.searchsorted(_poisson_cdf(float(mu)), u, side="left").astype(np.int64)


def respond(world: WorldModel, users: np.ndarray, items: np.ndarray, request_ids: np.ndarray,
            seed: int, click_factor: np.ndarray | float = 1.0,
            order_factor: np.ndarray | float = 1.0) -> Responses:
    """Draw the outcomes of slates `items` (n, k); the factors (scalar or one per request)
    multiply the click and order probabilities (effect injection)."""
    n, k = items.shape
    p = world.probabilities(users, items)
    p_click = np.minimum(1.0, p.click * np.reshape(click_factor, (-1, 1)))
    keys = request_keys(seed, request_ids)
    click = stage_uniforms(keys, k, "click") < p_click
    # Each later stage is drawn only at the cells where the one before happened: the same
    # uniforms as on the full (n, k) grid, for a fifth of the cells or fewer.
    rows, cols = np.nonzero(click)
    factor = np.broadcast_to(np.ravel(order_factor), (n,))
    p_order = np.minimum(1.0, p.order[rows, cols] * factor[rows])
    ordered = stage_uniforms_at(keys, rows, cols, k, "order") < p_order
    rows, cols = rows[ordered], cols[ordered]
    order = np.zeros((n, k), dtype=bool)
    order[rows, cols] = True
    cancelled = stage_uniforms_at(keys, rows, cols, k, "cancel") < world.cancel_rate
    cancel = np.zeros((n, k), dtype=bool)
    cancel[rows[cancelled], cols[cancelled]] = True
    quantity = np.zeros((n, k), dtype=np.int32)
    if len(rows):
        u = stage_uniforms_at(keys, rows, cols, k, "quantity")
        quantity[rows, cols] = 1 + poisson_quantile(u, world.quantity_extra).astype(np.int32)
    return Responses(click, order, cancel, quantity)

"""Arm → Recommender: the built-in popularity and random stacks, saved SID stacks, a hook.

The one place the simulator reaches the SID stack (`quasid.stack.serving.Stack.load`).

`arm_recommender(arm, context)` resolves an arm's `stack:` value, in this order:
1. a name registered with `register_stack(name, factory)` (built-ins: `popularity`,
   `random`); a factory takes a `StackContext` and returns a `Recommender`;
2. otherwise a saved stack directory, loaded with `quasid.stack.serving.Stack.load(dir)`.
The flows pipeline can also hand in ready stacks per arm name (`run_experiment(...,
stacks={"treatment": stack})`), which wins over the config. Stacks served from several
processes must be picklable (or named by directory, which each process loads itself).

A stack must be row-wise deterministic: a request's slate may depend on its own history
and user only, never on the other requests of the batch; otherwise events would depend on
how requests are batched and sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quasid.core.recommender import Recommender
from simulator.baselines import PopularityRecommender, RandomRecommender
from simulator.config import ArmSpec


@dataclass(frozen=True)
class StackContext:
    """What a stack factory may use: the catalog, the training logs, the seed, the arm."""

    catalog: np.ndarray  # all item ids
    train_items: np.ndarray  # item ids of the training interactions (cold items removed)
    seed: int
    arm: str
    options: dict = field(default_factory=dict)
    replicate: int = 0


StackFactory = Callable[[StackContext], Recommender]
_FACTORIES: dict[str, StackFactory] = {}


def register_stack(name: str, factory: StackFactory) -> None:
    """Make `stack: <name>` resolve to `factory(context)` (in this process)."""
    _FACTORIES[name] = factory


def registered_stacks() -> list[str]:
    """Names `stack:` can take besides a directory."""
    return sorted(_FACTORIES)


def _popularity(ctx: StackContext) -> Recommender:
    return PopularityRecommender.fit(ctx.catalog, ctx.train_items)


def _random(ctx: StackContext) -> Recommender:
    # each training replicate of a random arm is another random stack
    return RandomRecommender(ctx.catalog,
                             seed=int(ctx.options.get("seed", ctx.seed)) + ctx.replicate)


register_stack("popularity", _popularity)
register_stack("random", _random)


def load_stack_dir(path: str | Path, device: str = "cpu") -> Recommender:
    """Load a saved SID stack (`quasid.stack.serving.Stack.load`) onto `device`; clear errors
    when it cannot."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"stack {str(path)!r}: not a registered stack name "
                                f"({', '.join(registered_stacks())}) and not a directory")
    from quasid.stack.serving import (
        Stack,  # torch: only imported when a SID stack is served
    )

    return Stack.load(path, device=device)


def arm_recommender(arm: ArmSpec, ctx: StackContext, replicate: int = 0,
                    device: str = "cpu") -> Recommender:
    """The `Recommender` serving replicate `replicate` of `arm` (see the module docstring for
    the resolution order); saved SID stacks serve on `device`."""
    name = arm.stack_of(replicate)
    if name is None:
        raise ValueError(
            f"arm '{arm.name}' names tokenizer {arm.tokenizer!r} but no stack: `quasid "
            "simulate` replays built stacks only; run the pipeline (`quasid run --config`), "
            "which builds it, or set `stack:` to a saved stack directory")
    factory = _FACTORIES.get(name)
    stack = factory(ctx) if factory is not None else load_stack_dir(name, device)
    if not isinstance(stack, Recommender):
        raise TypeError(f"arm '{arm.name}': {type(stack).__name__} does not implement the "
                        "Recommender protocol (name, recommend)")
    return stack

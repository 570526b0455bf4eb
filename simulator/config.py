"""The experiment config (`quasid simulate --config experiment.yaml`), as pydantic models.

A YAML file maps onto `ExperimentConfig`; every field is documented below and in the
example configs in `configs/`. Unknown keys are errors (a typo never passes silently).

    experiment_id: aa_synthetic          # names the run; events go to experiment_id=<id>
    seed: 0                              # user responses are a function of (seed, request)
    data:
      path: data/synthetic               # a dataset folder (quasid data synth / import-amazon)
    arms:                                # >= 2 arms; allocation = share of ALL traffic
      - {name: control, stack: popularity, allocation: 0.5}
      - {name: treatment, stack: runs/stacks/quasid, allocation: 0.5}
    control: control                     # default: the first arm
    salt: aa_synthetic                   # the layer; default: experiment_id
    days: 14                             # experiment window length
    pre_days: 7                          # pre-period (everyone on control, for CUPED)
    slate_size: 10
    cohorts: [{name: premium, level: item, expr: "price > 40"}]
    effects: [{arm: treatment, on: order, factor: 1.05}]
    world: {kind: truth}                 # truth (synthetic only) | fitted

How an arm names its stack (`stack:`):
- `popularity`: most-interacted items of the training logs (before the window, cold items
  excluded), minus the request's history;
- `random`: uniformly random items (keyed on the request, so sharding changes nothing);
- any other value: a saved SID stack directory, loaded with `quasid.stack.serving.Stack.load(dir)`;
- a name registered with `simulator.arms.register_stack` (the flows pipeline's hook).
An arm may instead (or also) name a `tokenizer:` (e.g. `quasid`, `rqvae`): the flows
pipeline (`quasid run --config ...`) trains that tokenizer, builds its SID stack and fills
in `stack:`. `quasid simulate` alone replays saved stacks, so it needs `stack:`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from quasid.core.config import Config, load_yaml, parse
from quasid.core.schemas import COHORT_PREFIX, PRE_PERIOD_SUFFIX
from simulator.splitter import HOLDOUT_SALT

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
COHORT_NAME = r"^[a-z][a-z0-9_]*$"




class DataSpec(Config):
    """Where the logs come from and which of them form the experiment window."""

    path: Path = Field(description="Dataset folder (items.parquet, interactions.parquet, "
                                   "datacard.json[, world.npz]); relative to the working dir.")
    window_start: int | None = Field(
        None, description="ts at which the experiment window starts (default: the data "
                          "card's cutoff_ts). Datasets without a clock (cutoff_ts null, e.g. "
                          "Amazon) use window_last / pre_last instead.")
    window_last: int = Field(2, ge=1, description="Clockless data: each user's last N "
                                                  "interactions form the experiment window.")
    pre_last: int = Field(2, ge=0, description="Clockless data: the N interactions before "
                                               "the window form the pre-period.")


class ArmSpec(Config):
    """One arm: its name, traffic share and the stack that serves it."""

    name: str = Field(pattern=NAME)
    allocation: float = Field(gt=0, le=1, description="Share of all traffic (0.05 = 5%).")
    stack: str | list[str] | None = Field(
        None, description="popularity | random | a saved stack dir | a registered stack name; "
                          "with replicates > 1, one saved stack dir per replicate.")
    tokenizer: str | None = Field(None, description="Tokenizer the flows pipeline builds the "
                                                    "arm's SID stack from.")
    replicates: int = Field(1, ge=1, le=64, description=(
        "Training replicates: the arm's users are split into this many cells (by bucket), "
        "each served by its own stack, trained with its own seed; the analysis then covers "
        "training noise as well as the users'."))
    seeds: list[int] | None = Field(None, description=(
        "Training seed of each replicate (default: the run's seed + 0, 1, ...)."))
    options: dict = Field(default_factory=dict,
                          description="Passed to the stack factory (e.g. {seed: 3} for random).")

    @model_validator(mode="after")
    def _names_a_stack(self) -> ArmSpec:
        if self.stack is None and self.tokenizer is None:
            raise ValueError(f"arm '{self.name}' needs `stack:` (popularity, random or a saved "
                             "stack dir) or `tokenizer:` (built by the flows pipeline)")
        if isinstance(self.stack, list) and len(self.stack) != self.replicates:
            raise ValueError(f"arm '{self.name}': {len(self.stack)} stacks for "
                             f"{self.replicates} replicate(s) (expected one stack per replicate)")
        if self.seeds is not None and (len(self.seeds) != self.replicates
                                       or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"arm '{self.name}': seeds {self.seeds} (expected "
                             f"{self.replicates} distinct training seeds)")
        return self

    def stack_of(self, replicate: int) -> str | None:
        """The stack serving replicate `replicate` (the same one for every replicate when a
        single name is given)."""
        return self.stack[replicate] if isinstance(self.stack, list) else self.stack

    def training_seeds(self, run_seed: int) -> list[int]:
        """The training seed of each replicate."""
        return list(self.seeds) if self.seeds is not None else [
            run_seed + r for r in range(self.replicates)]


class CohortSpec(Config):
    """A user-defined cohort: a SQL boolean expression, parsed with `polars.sql_expr`.

    level `user`: evaluated on the users table (user_id, n_history = training interactions,
    is_cold_user); the flag goes into assignments and every event. level `item`: evaluated
    on the items table (item_id, price, category, is_cold); the flag goes on each event.
    """

    name: str = Field(pattern=COHORT_NAME)
    level: Literal["user", "item"]
    expr: str

    @field_validator("expr")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            pl.sql_expr(value)
        except Exception as exc:  # polars raises several error types for bad SQL
            raise ValueError(f"cannot parse SQL expression {value!r}: {exc}") from None
        return value

    @property
    def column(self) -> str:
        """The column the flag travels in (`cohort_<name>`)."""
        return f"{COHORT_PREFIX}{self.name}"


class EffectSpec(Config):
    """A known effect: multiply one arm's click or order probability by `factor`."""

    arm: str
    on: Literal["click", "order"]
    factor: float = Field(gt=0)


class HoldoutSpec(Config):
    """A share of users kept out of every experiment (hashed with its own salt)."""

    share: float = Field(0.0, ge=0, lt=1)
    salt: str = HOLDOUT_SALT


class FitSpec(Config):
    """The fitted world's preference model: BPR matrix factorisation (torch, seeded)."""

    dim: int = Field(32, ge=2)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4096, ge=16)
    lr: float = Field(0.05, gt=0)
    reg: float = Field(0.03, ge=0, description="L2 penalty; strong, because the world should "
                        "be smooth rather than memorise the logs (measured on the synthetic "
                        "world: see tests/simulator/test_fitted.py)")
    seed: int = 0


class CalibrationSpec(Config):
    """How the fitted world's probabilities are put on the logged scale (see simulator.fitted).

    source `impressions`: fit on impression logs (position bias, click scale and level,
    cancel rate, quantity); for a synthetic dataset they are drawn from its true world under
    a uniformly random logging policy over the `log_days` before the window. source
    `targets`: the logs carry no impressions (Amazon), so the click level (`ctr` of the
    `reference` stack), position bias and the order level are the stated assumptions below.
    The order model is fitted on the logged interactions when they mark purchases
    (`order_event`), else set to `order_rate`.
    """

    source: Literal["impressions", "targets"] = "impressions"
    log_days: int = Field(30, ge=1)
    ctr: float = Field(0.03, gt=0, lt=1)
    reference: Literal["popularity", "random"] = "popularity"
    position_decay: float = Field(0.8, ge=0)
    score_scale: float = Field(1.0, gt=0)
    order_event: str = "purchase"
    order_rate: float = Field(0.1, gt=0, lt=1)
    order_price_slope: float = -1.0
    cancel_rate: float = Field(0.08, ge=0, lt=1)
    quantity_extra: float = Field(0.3, ge=0)
    sample_requests: int = Field(20_000, ge=100)


class WorldSpec(Config):
    """Which world answers: the synthetic truth, or a world fitted on the logs."""

    kind: Literal["truth", "fitted"] = "truth"
    fit: FitSpec = FitSpec()
    calibration: CalibrationSpec = CalibrationSpec()


class ExperimentConfig(Config):
    """One simulated experiment (see the module docstring for a YAML example)."""

    experiment_id: str = Field(pattern=NAME)
    data: DataSpec
    arms: list[ArmSpec] = Field(min_length=2)
    control: str | None = None
    salt: str | None = None
    bucket_offset: int = Field(0, ge=0)
    holdout: HoldoutSpec = HoldoutSpec()
    days: int = Field(14, ge=1)
    pre_days: int = Field(7, ge=0)
    slate_size: int = Field(10, ge=1, le=200)
    history_len: int = Field(50, ge=1)
    seed: int = 0
    batch_size: int = Field(8192, ge=1)
    cohorts: list[CohortSpec] = Field(default_factory=list)
    effects: list[EffectSpec] = Field(default_factory=list)
    world: WorldSpec = WorldSpec()
    serving_device: str = Field("cpu", description=(
        "Device the saved SID stacks serve on (cpu, cuda, cuda:1): the flows pipeline sets "
        "it to the run's device."))

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names repeat: {names}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not an arm (arms: {names})")
        if self.experiment_id.endswith(PRE_PERIOD_SUFFIX):
            raise ValueError(f"experiment_id must not end with {PRE_PERIOD_SUFFIX!r} "
                             "(reserved for the pre-period)")
        for effect in self.effects:
            if effect.arm not in names:
                raise ValueError(f"effect on unknown arm {effect.arm!r} (arms: {names})")
        cohorts = [c.name for c in self.cohorts]
        if len(set(cohorts)) != len(cohorts):
            raise ValueError(f"cohort names repeat: {cohorts}")
        if sum(a.allocation for a in self.arms) > 1 + 1e-9:
            raise ValueError(f"allocations sum to more than 1: {[a.allocation for a in self.arms]}")
        return self

    @property
    def control_arm(self) -> str:
        """The control arm's name (the first arm unless `control` says otherwise)."""
        return self.control or self.arms[0].name

    @property
    def layer_salt(self) -> str:
        """The salt the buckets are hashed with (the experiment's layer)."""
        return self.salt or self.experiment_id

    @property
    def pre_experiment_id(self) -> str:
        """The pre-period's experiment id (`<experiment_id>__pre`)."""
        return self.experiment_id + PRE_PERIOD_SUFFIX

    def fingerprint(self) -> str:
        """sha256 of the config's canonical JSON (what a rerun must match to resume)."""
        import hashlib

        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config; `ConfigError` names the file and field."""
    return parse_config(load_yaml(path), source=str(path))


def parse_config(raw: object, source: str = "<config>") -> ExperimentConfig:
    """Validate a config given as a dict (or an `ExperimentConfig`, returned as is)."""
    return parse(ExperimentConfig, raw, source)

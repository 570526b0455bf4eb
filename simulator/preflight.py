"""Every check a simulated run needs, before anything is written (`quasid simulate`, `run`).

`check_experiment(cfg)` reads only file names, Parquet footers and one array of
`world.npz`; it raises `PreflightError` (a `ConfigError`: exit code 2 in the CLI) naming
the field and what was expected, for:
- the dataset folder: a folder holding `items.parquet` and `interactions.parquet` (and
  `world.npz` when `world.kind: truth`);
- `days` against the logs after the window start (the data card's clock);
- `slate_size` against the number of items and the world's positions (`position_bias` of
  a synthetic world; `simulator.fitted.MAX_POSITIONS` for a fitted one);
- each arm's `stack:`: a registered name or a saved stack folder holding `stack.pt`; an
  arm with only a `tokenizer:` needs its stack built first (the pipeline does).
The pipeline passes the shape of a world it is going to generate (`planned`) and the arms
whose stacks it builds (`built_arms`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.config import ConfigError
from quasid.core.layout import (
    DATACARD_FILE,
    INTERACTIONS_FILE,
    ITEMS_FILE,
    STACK_FILE,
    WORLD_FILE,
)
from quasid.data.world import DAY_SECONDS
from simulator.arms import registered_stacks
from simulator.config import ExperimentConfig
from simulator.fitted import MAX_POSITIONS


class PreflightError(ConfigError):
    """A run that would fail later: found before any file is written."""


@dataclass(frozen=True)
class DataShape:
    """What the checks need of a dataset: its items and its world's positions (or None)."""

    n_items: int
    positions: int | None
    cutoff_ts: int | None = None  # the data card's clock (None: no clock, a virtual window)
    end_ts: int | None = None


def data_shape(path: str | Path, needs_world: bool) -> DataShape:
    """Check a dataset folder's files and read its size (footers only)."""
    path = Path(path)
    if not path.is_dir():
        raise PreflightError(f"data.path: {path} is not a folder (expected a dataset folder "
                             f"with {ITEMS_FILE} and {INTERACTIONS_FILE}: `quasid data synth` "
                             "or `quasid data import-amazon` writes one)")
    missing = [n for n in (ITEMS_FILE, INTERACTIONS_FILE) if not (path / n).is_file()]
    if needs_world and not (path / WORLD_FILE).is_file():
        missing.append(f"{WORLD_FILE} (world.kind: truth; use world.kind: fitted for data "
                       "without a true model)")
    if missing:
        raise PreflightError(f"data.path: {path} lacks {', '.join(missing)} (expected a "
                             "dataset folder)")
    try:
        n_items = int(pl.scan_parquet(path / ITEMS_FILE).select(pl.len()).collect().item())
    except Exception as exc:  # noqa: BLE001 - any unreadable footer is bad input
        raise PreflightError(f"{path / ITEMS_FILE}: unreadable Parquet ({exc}) (expected the "
                             "items table)") from None
    card = {}
    if (path / DATACARD_FILE).is_file():
        try:
            card = json.loads((path / DATACARD_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PreflightError(f"{path / DATACARD_FILE}: unreadable ({exc}) (expected the "
                                 "data card's JSON)") from None
    positions = None
    if needs_world:
        try:
            with np.load(path / WORLD_FILE) as world:
                positions = int(len(world["position_bias"]))
        except Exception as exc:  # noqa: BLE001
            raise PreflightError(f"{path / WORLD_FILE}: unreadable ({exc}) (expected the "
                                 "synthetic world's truth)") from None
    return DataShape(n_items, positions, card.get("cutoff_ts"), card.get("end_ts"))


def check_experiment(cfg: ExperimentConfig, planned: DataShape | None = None,
                     built_arms: frozenset[str] | set[str] = frozenset(),
                     source: str = "config") -> DataShape:
    """Raise `PreflightError` for the first problem the run would meet; the data's shape."""
    truth = cfg.world.kind == "truth"
    shape = planned or data_shape(cfg.data.path, needs_world=truth)
    positions = shape.positions if truth else MAX_POSITIONS
    if cfg.slate_size > shape.n_items:
        raise PreflightError(f"{source}: slate_size: {cfg.slate_size} exceeds the dataset's "
                             f"{shape.n_items} items (expected at most {shape.n_items})")
    if positions is not None and cfg.slate_size > positions:
        world = "the synthetic world's" if truth else "the fitted world's"
        raise PreflightError(f"{source}: slate_size: {cfg.slate_size} exceeds {world} "
                             f"{positions} positions (expected at most {positions})")
    start = cfg.data.window_start if cfg.data.window_start is not None else shape.cutoff_ts
    if start is not None and shape.end_ts is not None:
        available = (int(shape.end_ts) - int(start)) // DAY_SECONDS
        if cfg.days > available:
            raise PreflightError(f"{source}: days: {cfg.days} runs the window past the end of "
                                 f"the logs (expected at most {available} days after the "
                                 "window start)")
    names = registered_stacks()
    for i, arm in enumerate(cfg.arms):
        where = f"{source}: arms[{i}] ({arm.name})"
        if arm.name in built_arms:
            continue
        if arm.stack is None:
            raise PreflightError(f"{where}: tokenizer {arm.tokenizer!r} but no stack (expected "
                                 "`stack:` a saved stack folder or one of "
                                 f"{', '.join(names)}; `quasid run` builds tokenizer arms)")
        if arm.stack in names:
            continue
        stack_dir = Path(arm.stack)
        if not (stack_dir / STACK_FILE).is_file():
            raise PreflightError(f"{where}: stack: {arm.stack!r} is neither a registered name "
                                 f"nor a stack folder with {STACK_FILE} (expected one of "
                                 f"{', '.join(names)}, or a folder `quasid run` built)")
    return shape

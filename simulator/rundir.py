"""The run directory of a simulated experiment: prepare it, read its plan, finalize it.

`prepare` checks the run directory (another plan in it is refused once any of its shards
finished; an unfinished one is cleared and restarted), writes the assignment table first and the plan (config
fingerprint, shard count), and fits the world when asked; `simulator.replay.run_shard` then
fills `events/`; `finalize` writes the manifest from the shards' records. `load_context`
reads what every shard needs (dataset, traffic, catalog, cohorts) once per process.

Run directory: `assignments.parquet`, `events/`, `manifest.json`, and the engine's own
`_simulator/` (plan, fitted world, shard records).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.cli import register_input_error
from quasid.core.hashing import files_digest
from quasid.core.io import write_frame_atomic, write_text_atomic
from quasid.core.layout import (
    ASSIGNMENTS_FILE,
    EVENTS_DIR,
    FITTED_WORLD_FILE,
    INTERACTIONS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    STATE_DIR,
    WORLD_FILE,
)
from quasid.data.dataset import Dataset, load_dataset
from quasid.data.world import DAY_SECONDS
from simulator.arms import StackContext
from simulator.cohorts import Catalog, user_table
from simulator.config import ExperimentConfig, parse_config
from simulator.events import (
    part_name,
)
from simulator.fitted import CalibrationInputs, FittedWorld, fit_world
from simulator.responses import TrueWorld, WorldModel
from simulator.splitter import Allocation, assign_arms, assignment_table, held_out
from simulator.traffic import Logs, Traffic, build_traffic

logger = logging.getLogger(__name__)
COUNT_KEYS = ("requests", "impressions", "clicks", "orders", "cancels", "gmv_cents")

ConfigLike = ExperimentConfig | Mapping | str | Path


@register_input_error
class RunDirError(RuntimeError):
    """A run directory that cannot be (re)used with this config or shard count."""


def as_config(config: ConfigLike) -> ExperimentConfig:
    """An `ExperimentConfig` from a model, a dict or a YAML path."""
    if isinstance(config, (str, Path)):
        from simulator.config import load_config

        return load_config(config)
    return parse_config(dict(config) if isinstance(config, Mapping) else config)


def data_fingerprint(root: Path) -> str:
    """sha256 over the dataset files the simulation reads (items, interactions, world)."""
    return files_digest(root, (ITEMS_FILE, INTERACTIONS_FILE, WORLD_FILE))


def allocation_of(cfg: ExperimentConfig) -> Allocation:
    """The config's traffic split as an `Allocation`."""
    return Allocation(tuple((a.name, a.allocation) for a in cfg.arms), salt=cfg.layer_salt,
                      replicates=tuple(a.replicates for a in cfg.arms),
                      offset=cfg.bucket_offset, holdout=cfg.holdout.share,
                      holdout_salt=cfg.holdout.salt)


# ---------------------------------------------------------------- the shared context


@dataclass
class Context:
    """Everything a shard needs besides its users: data, requests, catalog, world, stacks."""

    cfg: ExperimentConfig
    dataset: Dataset
    logs: Logs
    traffic: Traffic
    catalog: Catalog
    stack_context: StackContext
    world: WorldModel | None = None


_CONTEXT: dict[tuple[str, str], Context] = {}


def load_context(cfg: ExperimentConfig) -> Context:
    """Load the dataset and derive the requests (cached per config within a process)."""
    key = (cfg.fingerprint(), "")
    if key in _CONTEXT:
        return _CONTEXT[key]
    dataset = load_dataset(cfg.data.path)
    if not 1 <= cfg.slate_size <= dataset.items.height:
        raise ValueError(f"slate_size {cfg.slate_size} must be between 1 and the number of "
                         f"items ({dataset.items.height}) in {cfg.data.path}")
    logs = Logs.from_interactions(dataset.interactions)
    end_ts = dataset.datacard.get("end_ts")
    traffic = build_traffic(logs, dataset.cutoff_ts, end_ts, cfg.days, cfg.pre_days,
                            cfg.data.window_start, cfg.data.window_last, cfg.data.pre_last,
                            source=str(cfg.data.path))
    if traffic.experiment.height == 0:
        raise ValueError(f"{cfg.data.path}: the experiment window {traffic.window} holds no "
                         "logged interactions")
    catalog = Catalog.from_items(dataset.items, cfg.cohorts)
    cold = catalog.is_cold[catalog.rows(logs.item, source=str(cfg.data.path))]
    stack_ctx = StackContext(catalog=catalog.item_ids, train_items=logs.item[traffic.train & ~cold],
                             seed=cfg.seed, arm="")
    ctx = Context(cfg, dataset, logs, traffic, catalog, stack_ctx)
    _CONTEXT.clear()  # one experiment's data at a time: memory stays bounded
    _CONTEXT[key] = ctx
    return ctx


def _world(ctx: Context, out: Path) -> WorldModel:
    if ctx.world is None:
        if ctx.cfg.world.kind == "truth":
            if ctx.dataset.world is None:
                raise ValueError(f"{ctx.cfg.data.path}: world.kind 'truth' needs a synthetic "
                                 f"dataset with {WORLD_FILE}; use world.kind: fitted")
            ctx.world = TrueWorld(ctx.dataset.world)
        else:
            path = out / STATE_DIR / FITTED_WORLD_FILE
            if not path.exists():
                raise RunDirError(f"{path}: the fitted world is missing; run prepare first")
            ctx.world = FittedWorld.load(path)
    return ctx.world


# ---------------------------------------------------------------- prepare


def _plan(cfg: ExperimentConfig, n_shards: int) -> dict:
    return {"config_fingerprint": cfg.fingerprint(), "n_shards": n_shards,
            "data_fingerprint": data_fingerprint(cfg.data.path)}


def _check_plan(out: Path, plan: dict) -> bool:
    """True if `out` already holds this plan; error if it holds another; False if none."""
    path = out / STATE_DIR / PLAN_FILE
    if not path.exists():
        if (out / "events").exists() or (out / MANIFEST_FILE).exists():
            raise RunDirError(f"{out}: holds events or a manifest but no {STATE_DIR}/{PLAN_FILE}; "
                              "use an empty output directory")
        return False
    old = json.loads(path.read_text())
    for key, what in (("config_fingerprint", "config"), ("n_shards", "shard count"),
                      ("data_fingerprint", "data")):
        if old.get(key) != plan[key]:
            if not finished_shards(out) and not (out / MANIFEST_FILE).exists():
                # nothing of the other plan finished (e.g. a run that failed and was then
                # corrected): start again cleanly rather than refuse forever
                clear_run_dir(out)
                logger.warning("%s: held an unfinished run with another %s; nothing of it "
                               "had finished, so it was cleared and restarts", out, what)
                return False
            raise RunDirError(
                f"{out}: holds a run with another {what} ({key} {old.get(key)!r}, now "
                f"{plan[key]!r}) of which shards finished (expected the same config and "
                "shard count to resume it, or a fresh output directory: events of two "
                "plans would mix)")
    return True


def finished_shards(out: str | Path) -> list[Path]:
    """The shard records of a run directory (one per finished shard)."""
    return sorted((Path(out) / STATE_DIR / "shards").glob("shard-*.json"))


def clear_run_dir(out: str | Path) -> None:
    """Delete what `prepare` and the shards wrote (assignments, events, state, manifest)."""
    out = Path(out)
    for name in (EVENTS_DIR, STATE_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (ASSIGNMENTS_FILE, MANIFEST_FILE):
        (out / name).unlink(missing_ok=True)


def window_units(ctx: Context) -> pl.DataFrame:
    """Users with at least one request in the window, and the time of their first one."""
    return (ctx.traffic.experiment.group_by("user_id")
            .agg(pl.col("ts").min().alias("assigned_at"))
            .rename({"user_id": "unit_id"}).sort("unit_id"))


def build_assignments(cfg: ExperimentConfig, ctx: Context | None = None) -> pl.DataFrame:
    """The assignment table (with cohort flags), rebuilt from the config's salt alone."""
    ctx = ctx or load_context(cfg)
    units = window_units(ctx)
    users = user_table(ctx.logs.user[ctx.traffic.train], units["unit_id"].to_numpy(), cfg.cohorts)
    flags = [c for c in users.columns if c not in ("user_id", "n_history")]
    units = units.join(users.rename({"user_id": "unit_id"}), on="unit_id", how="left")
    return assignment_table(cfg.experiment_id, units, allocation_of(cfg), extra=flags)


def prepare(config: ConfigLike, out_dir: str | Path, n_shards: int = 1) -> dict:
    """Check the run directory, write the assignments (first) and the fitted world; the plan."""
    cfg = as_config(config)
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    out = Path(out_dir)
    plan = _plan(cfg, n_shards)
    resumed = _check_plan(out, plan)
    ctx = load_context(cfg)
    assignments = build_assignments(cfg, ctx)
    if assignments.height == 0:
        raise ValueError(f"experiment {cfg.experiment_id}: no user falls in any arm "
                         f"(allocations {[a.allocation for a in cfg.arms]})")
    write_frame_atomic(assignments, out / ASSIGNMENTS_FILE)
    fitted_path = out / STATE_DIR / FITTED_WORLD_FILE
    if cfg.world.kind == "fitted" and not (resumed and fitted_path.exists()):
        _fit_and_save_world(ctx, out)
    write_text_atomic(json.dumps(plan, indent=2, sort_keys=True) + "\n",
                      out / STATE_DIR / PLAN_FILE)
    return plan


def _fit_and_save_world(ctx: Context, out: Path) -> FittedWorld:
    cfg, logs, traffic = ctx.cfg, ctx.logs, ctx.traffic
    rows = traffic.experiment["request_id"].to_numpy()
    cal_rows = None
    if cfg.world.calibration.source == "impressions" and (
            ctx.dataset.world is None or traffic.clock != "logged"):
        raise ValueError(f"{cfg.data.path}: world.calibration.source 'impressions' needs "
                         "impression logs, which only a synthetic dataset with a clock and "
                         f"{WORLD_FILE} can draw; set world.calibration.source: targets")
    if cfg.world.calibration.source == "impressions":
        start = traffic.window[0]
        log_start = start - cfg.world.calibration.log_days * DAY_SECONDS
        in_log = (logs.ts >= log_start) & (logs.ts < start)
        cal_rows = np.flatnonzero(in_log)
    inputs = CalibrationInputs(
        interactions=ctx.dataset.interactions,
        items=ctx.dataset.items,
        window_users=logs.user[rows],
        window_histories=logs.histories(rows, cfg.history_len),
        train_items=ctx.stack_context.train_items,
        calibration_users=None if cal_rows is None else logs.user[cal_rows],
        calibration_histories=(None if cal_rows is None
                               else logs.histories(cal_rows, cfg.history_len)),
        calibration_request_ids=cal_rows,
        truth=TrueWorld(ctx.dataset.world) if ctx.dataset.world is not None else None,
        slate_size=cfg.slate_size,
        seed=cfg.seed,
    )
    world = fit_world(inputs, cfg.world.fit, cfg.world.calibration)
    world.save(out / STATE_DIR / FITTED_WORLD_FILE)
    ctx.world = world
    return world


# ---------------------------------------------------------------- shards


def _marker(out: Path, shard: int, n_shards: int) -> Path:
    return out / STATE_DIR / "shards" / f"shard-{shard:05d}-of-{n_shards:05d}.json"


def _read_plan(out: Path, cfg: ExperimentConfig, n_shards: int) -> dict:
    path = out / STATE_DIR / PLAN_FILE
    if not path.exists():
        raise RunDirError(f"{path}: missing; call prepare (or run_experiment) before run_shard")
    plan = json.loads(path.read_text())
    if plan["config_fingerprint"] != cfg.fingerprint() or plan["n_shards"] != n_shards:
        raise RunDirError(f"{out}: prepared for another config or shard count "
                          f"({plan['n_shards']} shards); prepare this one in a fresh directory")
    if plan["data_fingerprint"] != data_fingerprint(cfg.data.path):
        raise RunDirError(f"{cfg.data.path}: the data changed since {out} was prepared; "
                          "rerun in a fresh directory")
    return plan


def _remove_stale_temps(out: Path, shard: int, n_shards: int) -> None:
    """Temporary files a killed run of this shard left behind (never read: not *.parquet)."""
    events = out / "events"
    if events.exists():
        for tmp in events.glob(f"*/*/.{part_name(shard, n_shards)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def add_counts(acc: dict, counts: Mapping[str, Mapping[str, int]]) -> None:
    """Add per-arm counts (`COUNT_KEYS`, e.g. `simulator.events.batch_counts`) into `acc`."""
    for arm, row in counts.items():
        total = acc.setdefault(arm, dict.fromkeys(COUNT_KEYS, 0))
        for key in COUNT_KEYS:
            total[key] += int(row[key])


# ---------------------------------------------------------------- the whole run


def finalize(config: ConfigLike, out_dir: str | Path, n_shards: int) -> dict:
    """Write `manifest.json` from the shard records (all must be done); returns it."""
    cfg = as_config(config)
    out = Path(out_dir)
    plan = _read_plan(out, cfg, n_shards)
    missing = [s for s in range(n_shards) if not _marker(out, s, n_shards).exists()]
    if missing:
        raise RunDirError(f"{out}: shards {missing} are not done; rerun to finish them")
    totals: dict = {"pre": {}, "experiment": {}}
    for s in range(n_shards):
        record = json.loads(_marker(out, s, n_shards).read_text())
        for period, arms in record["counts"].items():
            add_counts(totals[period], arms)
    assignments = pl.read_parquet(out / ASSIGNMENTS_FILE)
    users = dict(assignments.group_by("arm").len().sort("arm").iter_rows())
    ctx = load_context(cfg)
    units = window_units(ctx)["unit_id"].to_numpy()
    alloc = allocation_of(cfg)
    arm, _ = assign_arms(units, alloc)
    n_held = int(held_out(units, alloc).sum())
    world = _world(ctx, out)
    manifest = {
        "experiment_id": cfg.experiment_id,
        "pre_experiment_id": cfg.pre_experiment_id if cfg.pre_days > 0 else None,
        "arms": {a.name: a.allocation for a in cfg.arms},
        "control": cfg.control_arm,
        "seed": cfg.seed,
        "salt": cfg.layer_salt,
        "bucket_offset": cfg.bucket_offset,
        "holdout": cfg.holdout.model_dump(),
        "config": cfg.model_dump(mode="json"),
        "config_fingerprint": plan["config_fingerprint"],
        "data_fingerprint": plan["data_fingerprint"],
        "data": {"path": str(cfg.data.path), "name": ctx.dataset.name,
                 "clock": ctx.traffic.clock, "window": list(ctx.traffic.window)},
        "slate_size": cfg.slate_size,
        "days": cfg.days,
        "pre_days": cfg.pre_days,
        "n_shards": n_shards,
        "effects": [e.model_dump() for e in cfg.effects],
        "cohorts": {c.column: {"level": c.level, "expr": c.expr} for c in cfg.cohorts},
        "world": world.describe(),
        "counts": {
            "units_in_window": int(len(units)),
            "held_out": n_held,
            "not_allocated": int((arm < 0).sum()) - n_held,
            "users": {a: int(users.get(a, 0)) for a in users},
            "experiment": totals["experiment"],
            "pre": totals["pre"],
        },
    }
    write_text_atomic(json.dumps(manifest, indent=2, sort_keys=True) + "\n", out / MANIFEST_FILE)
    return manifest


def total_requests(config: ConfigLike, out_dir: str | Path, n_shards: int) -> int:
    """Requests still to serve (both periods) in the shards not yet done."""
    cfg = as_config(config)
    out = Path(out_dir)
    ctx = load_context(cfg)
    assignments = pl.read_parquet(out / ASSIGNMENTS_FILE)
    todo = [s for s in range(n_shards) if not _marker(out, s, n_shards).exists()]
    users = assignments.filter((pl.col("bucket") % n_shards).is_in(todo)).select("unit_id")
    return sum(r.join(users, left_on="user_id", right_on="unit_id", how="semi").height
               for r in (ctx.traffic.pre, ctx.traffic.experiment))


def summary_table(manifest: dict) -> list[dict]:
    """Per arm of the experiment period: users, requests, CTR, orders, GMV (for people)."""
    rows = []
    counts = manifest["counts"]
    for arm in manifest["arms"]:
        c = counts["experiment"].get(arm, dict.fromkeys(COUNT_KEYS, 0))
        n_users = counts["users"].get(arm, 0)
        gmv = c["gmv_cents"] / 100
        rows.append({
            "arm": arm, "users": n_users, "requests": c["requests"],
            "impressions": c["impressions"], "clicks": c["clicks"],
            "ctr": c["clicks"] / c["impressions"] if c["impressions"] else 0.0,
            "orders": c["orders"], "completed_orders": c["orders"] - c["cancels"],
            "conversion": c["orders"] / c["clicks"] if c["clicks"] else 0.0,
            "gmv": gmv, "gmv_per_user": gmv / n_users if n_users else 0.0,
        })
    return rows

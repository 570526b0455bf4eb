"""The replay engine: logged requests -> each arm's stack -> slate -> world -> events.

`run_experiment(config, out_dir, n_shards, map_fn)` = `prepare` (check the run directory,
write the assignment table first, fit the world when asked) -> `run_shard` for every
shard (through `map_fn`, e.g. a Prefect task runner or Dask; in-process by default) ->
`finalize` (the manifest, from the shards' records).

`run_shard(config, shard, n_shards, out_dir)` is a plain picklable function. A shard holds
the users whose bucket % n_shards == shard; it streams their requests day by day in
batches (memory grows with two days of one shard, the one written and the one simulated,
not with the number of days), validates and writes one Parquet file per (experiment, day)
atomically on a writer thread while the next day is simulated, and records itself as done
last, once every file is in place. Between
batches it checks the stop flag (`quasid.core.interrupt`): after a SIGINT it leaves with
`Interrupted` within one batch, with no half-written file. A rerun
skips finished shards and rewrites unfinished ones under the same names, so no event is
ever duplicated. All randomness is keyed on (seed, request id), so the events are the same
whatever the number of shards.

The run directory itself (`assignments.parquet`, `events/`, `manifest.json`, and the
engine's own `_simulator/`: plan, fitted world, shard records) is `simulator.rundir`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.interrupt import check_stop
from quasid.core.io import write_text_atomic
from quasid.core.layout import (
    ASSIGNMENTS_FILE,
)
from quasid.core.recommender import Recommender
from quasid.core.schemas import ASSIGNMENTS, REPLICATE_COLUMN, validate
from simulator.arms import StackContext, arm_recommender
from simulator.config import ExperimentConfig
from simulator.events import (
    batch_counts,
    event_frame,
    part_name,
    partition_dir,
    write_events,
)
from simulator.responses import WorldModel, respond
from simulator.rundir import (
    ConfigLike,
    Context,
    _marker,
    _read_plan,
    _remove_stale_temps,
    _world,
    add_counts,
    as_config,
    finalize,
    load_context,
    prepare,
    total_requests,
)

MAX_REPLICATES = 64
"""Cells per arm at most (`ArmSpec.replicates`' bound)."""

MapFn = Callable[[Callable[[int], dict], Iterable[int]], Iterable[dict]]


def run_shard(config: ConfigLike, shard: int, n_shards: int, out_dir: str | Path,
              stacks: Mapping[str, Recommender] | None = None,
              progress: Callable[[int], None] | None = None) -> dict:
    """Simulate one shard (users with bucket % n_shards == shard); returns its counts.

    Needs a prepared run directory (`prepare`). Skips the shard if it is already done.
    `stacks` overrides the config's stack per arm name; `progress(n)` is called after each
    batch with the number of requests it served.
    """
    cfg = as_config(config)
    out = Path(out_dir)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    _read_plan(out, cfg, n_shards)
    marker = _marker(out, shard, n_shards)
    if marker.exists():
        return json.loads(marker.read_text())
    _remove_stale_temps(out, shard, n_shards)
    ctx = load_context(cfg)
    world = _world(ctx, out)
    served = _stacks(cfg, ctx, stacks)
    assignments = validate(pl.read_parquet(out / ASSIGNMENTS_FILE), ASSIGNMENTS,
                           source=str(out / ASSIGNMENTS_FILE))
    mine = assignments.filter(pl.col("bucket") % n_shards == shard)
    arm_names = [a.name for a in cfg.arms]
    counts = {}
    files = []
    # Day d's file is validated and written on a second thread while day d + 1 is simulated
    # (polars leaves the GIL while it encodes, so the writer gets a core of its own): at most
    # one finished day waits in memory. A failed write stops the shard before the next day
    # is handed over; leaving the block waits for the write in flight, so an error or an
    # interrupt never leaves a file half-written, and the shard record comes last.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-writer") as writer:
        pending: Future | None = None
        for period in ("pre", "experiment"):
            requests = ctx.traffic.pre if period == "pre" else ctx.traffic.experiment
            requests = requests.join(mine.select("unit_id"), left_on="user_id",
                                     right_on="unit_id", how="semi").sort("request_id")
            exp_id = cfg.pre_experiment_id if period == "pre" else cfg.experiment_id
            counts[period] = {}
            for day in sorted(requests["day"].unique().to_list()):
                frame, day_counts = _simulate_day(cfg, ctx, world, served, mine, arm_names,
                                                  period, requests.filter(pl.col("day") == day),
                                                  progress)
                path = partition_dir(out, exp_id, day) / part_name(shard, n_shards)
                if pending is not None:
                    pending.result()
                pending = writer.submit(write_events, frame, path)
                del frame  # the writer holds the only reference: freed once written
                files.append(str(path.relative_to(out)))
                add_counts(counts[period], day_counts)
        if pending is not None:
            pending.result()
    record = {"shard": shard, "n_shards": n_shards, "counts": counts, "files": files}
    write_text_atomic(json.dumps(record, indent=2, sort_keys=True) + "\n", marker)
    return record


def _stacks(cfg: ExperimentConfig, ctx: Context, overrides: Mapping[str, Recommender] | None
            ) -> dict[tuple[str, int], Recommender]:
    """The stack of every (arm, replicate) cell; `overrides` (per arm name) serve all of an
    arm's cells."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {a.name for a in cfg.arms}
    if unknown:
        raise ValueError(f"stacks given for unknown arms {sorted(unknown)}")
    out = {}
    for arm in cfg.arms:
        for r in range(arm.replicates):
            if arm.name in overrides:
                out[arm.name, r] = overrides[arm.name]
            else:
                sctx = StackContext(ctx.stack_context.catalog, ctx.stack_context.train_items,
                                    cfg.seed, arm.name, dict(arm.options), r)
                out[arm.name, r] = arm_recommender(arm, sctx, r, cfg.serving_device)
    return out


def _simulate_day(cfg: ExperimentConfig, ctx: Context, world: WorldModel,
                  stacks: dict[tuple[str, int], Recommender], assignments: pl.DataFrame,
                  arm_names: list[str],
                  period: str, requests: pl.DataFrame,
                  progress: Callable[[int], None] | None) -> tuple[pl.DataFrame, dict]:
    """Events of one day of one shard (requests sorted by id), in batches, and their
    counts per arm (`batch_counts`)."""
    units = assignments["unit_id"].to_numpy()
    flag_cols = [c for c in assignments.columns if c.startswith(("is_cold_user", "cohort_"))]
    arm_of_unit = (assignments["arm"].replace_strict(arm_names, list(range(len(arm_names))),
                                                     return_dtype=pl.Int64).to_numpy())
    replicate_of_unit = assignments[REPLICATE_COLUMN].to_numpy().astype(np.int64)
    flags_of_unit = {c: assignments[c].to_numpy() for c in flag_cols}  # once, not per batch
    click_factor = np.ones(len(arm_names))
    order_factor = np.ones(len(arm_names))
    if period == "experiment":
        for effect in cfg.effects:
            target = click_factor if effect.on == "click" else order_factor
            target[arm_names.index(effect.arm)] *= effect.factor
    control = arm_names.index(cfg.control_arm)
    k = cfg.slate_size
    frames = []
    counts: dict = {}
    exp_id = cfg.pre_experiment_id if period == "pre" else cfg.experiment_id
    for start in range(0, requests.height, cfg.batch_size):
        check_stop()  # Ctrl-C: leave between batches (nothing of this day is written yet)
        batch = requests.slice(start, cfg.batch_size)
        req = {c: batch[c].to_numpy() for c in ("request_id", "user_id", "ts", "day")}
        unit_row = np.searchsorted(units, req["user_id"])
        # the pre-period serves everyone control's first replicate (covariates only)
        experiment = period == "experiment"
        arm = arm_of_unit[unit_row] if experiment else np.full(len(unit_row), control)
        replicate = replicate_of_unit[unit_row] if experiment else np.zeros(len(unit_row), np.int64)
        hist = ctx.logs.histories(req["request_id"], cfg.history_len)
        items = np.empty((len(unit_row), k), dtype=np.int64)
        item_rows = np.empty((len(unit_row), k), dtype=np.int64)
        cell = arm * MAX_REPLICATES + replicate
        cells = np.unique(cell)
        for c in cells:
            # one cell (the pre-period, a single-cell batch): the whole batch, uncopied
            sel = slice(None) if len(cells) == 1 else cell == c
            name, r = arm_names[c // MAX_REPLICATES], int(c % MAX_REPLICATES)
            slate, _ = stacks[name, r].recommend(hist[sel], k, req["user_id"][sel])
            slate = _check_slate(slate, len(hist) if len(cells) == 1 else int(sel.sum()), k, name)
            items[sel] = slate
            item_rows[sel] = ctx.catalog.rows(slate, source=f"arm '{name}' stack")
        responses = respond(world, req["user_id"], items, req["request_id"], cfg.seed,
                            click_factor[arm], order_factor[arm])
        item_flags = {"is_cold_item": ctx.catalog.is_cold[item_rows],
                      **{name: flag[item_rows] for name, flag in ctx.catalog.flags.items()}}
        user_flags = {c: flag[unit_row] for c, flag in flags_of_unit.items()}
        user_flags[REPLICATE_COLUMN] = replicate.astype(np.int16)
        price = ctx.catalog.price[item_rows]
        frames.append(event_frame(exp_id, arm_names, arm, req, items, responses, price,
                                  item_flags, user_flags))
        add_counts(counts, batch_counts(arm_names, arm, responses, price))
        if progress is not None:
            progress(len(unit_row))
    return pl.concat(frames), counts


def _check_slate(slate: np.ndarray, n: int, k: int, arm: str) -> np.ndarray:
    slate = np.asarray(slate)
    if slate.shape != (n, k):
        raise ValueError(f"arm '{arm}': the stack returned slates of shape {slate.shape}, "
                         f"expected {(n, k)}")
    ordered = np.sort(slate, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError(f"arm '{arm}': the stack returned a slate with a repeated item")
    return slate


def run_experiment(config: ConfigLike, out_dir: str | Path, n_shards: int = 1,
                   map_fn: MapFn | None = None, stacks: Mapping[str, Recommender] | None = None,
                   progress: Callable[[int], None] | None = None,
                   on_prepared: Callable[[int], None] | None = None) -> dict:
    """Run a whole experiment into `out_dir`; returns the manifest.

    `map_fn(fn, shards)` maps `fn(shard) -> record` over the shard numbers (default: in
    this process, one after another); e.g. a Prefect task runner's `.map` or a Dask
    client's. `fn` is a `functools.partial` of `run_shard`, picklable when `stacks` is.
    `on_prepared(total_requests)` is called once the plan is in place (progress bars).
    """
    cfg = as_config(config)
    prepare(cfg, out_dir, n_shards)
    if on_prepared is not None:
        on_prepared(total_requests(cfg, out_dir, n_shards))
    fn = partial(_shard_job, cfg, n_shards=n_shards, out_dir=str(out_dir), stacks=stacks,
                 progress=progress if map_fn is None else None)
    if map_fn is None:
        for shard in range(n_shards):
            fn(shard)
    else:
        list(map_fn(fn, range(n_shards)))
    return finalize(cfg, out_dir, n_shards)


def _shard_job(cfg: ExperimentConfig, shard: int, n_shards: int, out_dir: str,
               stacks: Mapping[str, Recommender] | None,
               progress: Callable[[int], None] | None) -> dict:
    """`run_shard` with the shard number first-positional-after-config (for partial + map)."""
    return run_shard(cfg, shard, n_shards, out_dir, stacks=stacks, progress=progress)

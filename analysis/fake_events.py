"""Fake run directories with known properties, written by DuckDB SQL (tests and benchmarks).

The analysis must not wait for the simulator, and its tests need events whose truth is
known. `write_fake_run` writes a run directory that follows the contracts
(`assignments.parquet`, `events/experiment_id=X/day=D/*.parquet`, `manifest.json` with
the event counts per experiment, arm and type and per day, and the list of event files the
analysis reconciles against), including a pre-period (`X__pre`) for CUPED. Every random draw is a hash of (seed, stream,
row key), so the same config gives the same rows, at any size: 100M events come straight out
of `range()` without Python ever holding a row.

The model, per request (a slate of `slate` distinct items shown to one user on one day):
- users' activity is skewed (user `floor(n_active * u ** activity_skew)` gets the request),
  so a few users are heavy and the pre-period predicts the experiment (CUPED has signal);
  the last `inactive_share` of the assigned users never appear in events (they count as 0);
- each impression is clicked with `p_click × c_u` (a per-user factor in [0.5, 1.5]), a
  click becomes an order with `p_order × o_u × (1 + effect[arm]) × (1 + cold_item_effect[arm]
  on cold items)`, an order is cancelled with `p_cancel`; so the true relative uplift of
  orders, completed orders and GMV in an arm is exactly `effect[arm]` (without cold effect);
- item prices are log-normal, quantities 1 or 2, `value` = price × quantity on orders and
  on the cancels that void them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

from quasid.core.io import DIR_MODE
from quasid.core.schemas import PRE_PERIOD_SUFFIX

_U64 = 18446744073709551616.0


@dataclass(frozen=True)
class FakeRunConfig:
    """What `write_fake_run` generates (sizes, arms, injected effects, cohorts, seed)."""

    experiment_id: str = "fake"
    n_users: int = 2_000
    days: int = 7
    pre_days: int = 7
    requests_per_user_day: float = 1.0
    slate: int = 5
    n_items: int = 5_000
    arms: dict[str, float] = field(default_factory=lambda: {"control": 0.5, "treatment": 0.5})
    control: str = "control"
    effects: dict[str, float] = field(default_factory=dict)
    cold_item_effects: dict[str, float] = field(default_factory=dict)
    p_click: float = 0.1
    p_order: float = 0.3
    p_cancel: float = 0.1
    activity_skew: float = 1.5
    inactive_share: float = 0.05
    cold_item_share: float = 0.1
    cold_user_share: float = 0.2
    user_cohorts: dict[str, float] = field(default_factory=lambda: {"vip": 0.1})
    event_cohorts: dict[str, float] = field(default_factory=lambda: {"mobile": 0.6})
    seed: int = 0

    @property
    def n_active(self) -> int:
        """Users that can appear in events (the rest are assigned but idle)."""
        return max(1, round(self.n_users * (1.0 - self.inactive_share)))


def _macros(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    # DuckDB's multi-argument hash() combines its arguments weakly (hash(i, 7) and
    # hash(i, 8) correlate at -0.6), so each draw re-hashes the key xor a salt instead.
    con.execute(f"""
        CREATE OR REPLACE TEMP MACRO unif(key, stream) AS
            hash(xor(hash(key), ({seed}::UBIGINT * 1024 + stream)::UBIGINT))::DOUBLE / {_U64};
        CREATE OR REPLACE TEMP MACRO gauss(key, stream) AS
            sqrt(-2 * ln(1 - unif(key, stream))) * cos(2 * pi() * unif(key, stream + 1));
    """)


def _arm_case(arms: dict[str, float], u: str) -> str:
    """SQL CASE mapping a uniform draw to an arm by cumulative allocation share."""
    total = sum(arms.values())
    parts, acc = [], 0.0
    names = list(arms)
    for name in names[:-1]:
        acc += arms[name] / total
        parts.append(f"WHEN {u} < {acc!r} THEN '{name}'")
    return f"CASE {' '.join(parts)} ELSE '{names[-1]}' END"


def _per_arm(values: dict[str, float], arm: str) -> str:
    """SQL CASE giving each arm's value from `values` (0 for arms not listed)."""
    if not values:
        return "0.0"
    whens = " ".join(f"WHEN {arm} = '{k}' THEN {float(v)!r}" for k, v in values.items())
    return f"CASE {whens} ELSE 0.0 END"


def _users_sql(cfg: FakeRunConfig) -> str:
    cohorts = "".join(
        f", unif(user_id, {40 + i}) < {share!r} AS cohort_{name}"
        for i, (name, share) in enumerate(sorted(cfg.user_cohorts.items()))
    )
    return f"""
        SELECT user_id, {_arm_case(cfg.arms, 'unif(user_id, 1)')} AS arm,
               (hash(xor(hash(user_id), {cfg.seed}::UBIGINT)) % 1000)::INTEGER AS bucket,
               unif(user_id, 2) < {cfg.cold_user_share!r} AS is_cold_user,
               0.5 + unif(user_id, 3) AS click_factor,
               0.5 + unif(user_id, 4) AS order_factor
               {cohorts}
        FROM range({cfg.n_users}) t(user_id)
    """


def _events_sql(cfg: FakeRunConfig, experiment_id: str, days: int, salt: int,
                pre: bool) -> str:
    """Events of one experiment window as a SQL query (impressions, clicks, orders, cancels)."""
    n_requests = max(1, round(cfg.n_users * days * cfg.requests_per_user_day))
    stride = max(1, cfg.n_items // cfg.slate)
    n_cold_items = round(cfg.n_items * cfg.cold_item_share)
    arm = "'pre'" if pre else "u.arm"
    effect = "0.0" if pre else _per_arm(cfg.effects, "u.arm")
    cold_effect = "0.0" if pre else _per_arm(cfg.cold_item_effects, "u.arm")
    ev_cohorts = "".join(
        f", unif(r.request_id, {salt + 60 + i}) < {share!r} AS cohort_{name}"
        for i, (name, share) in enumerate(sorted(cfg.event_cohorts.items()))
    )
    ev_cohort_cols = "".join(f", cohort_{name}" for name in sorted(cfg.event_cohorts))
    return f"""
        WITH requests AS (
            SELECT request_id,
                   LEAST({cfg.n_active - 1},
                         floor({cfg.n_active} * pow(unif(request_id, {salt + 10}),
                                                    {cfg.activity_skew!r})))::BIGINT AS user_id,
                   LEAST({days - 1}, floor(unif(request_id, {salt + 11}) * {days}))::INTEGER AS day,
                   floor(unif(request_id, {salt + 12}) * {cfg.n_items})::BIGINT AS first_item
            FROM range({n_requests}) t(request_id)
        ),
        shown AS (
            SELECT r.request_id, r.user_id, r.day, {arm} AS arm, u.is_cold_user,
                   p.position::SMALLINT AS position,
                   ((r.first_item + p.position * {stride}) % {cfg.n_items})::BIGINT AS item_id,
                   r.day::BIGINT * 86400 + floor(unif(r.request_id, {salt + 13}) * 80000)::BIGINT
                       AS ts,
                   u.click_factor, u.order_factor, ({effect}) AS effect,
                   ({cold_effect}) AS cold_effect
                   {ev_cohorts}
            FROM requests r
            JOIN users u USING (user_id)
            CROSS JOIN range({cfg.slate}) p(position)
        ),
        draws AS (
            SELECT *, item_id < {n_cold_items} AS is_cold_item,
                   hash(xor(hash(item_id), 977::UBIGINT)) AS item_key,
                   request_id * {cfg.slate} + position AS key
            FROM shown
        ),
        outcomes AS (
            SELECT *,
                   unif(key, {salt + 20}) < {cfg.p_click!r} * click_factor AS clicked,
                   unif(key, {salt + 21}) < {cfg.p_order!r} * order_factor * (1 + effect)
                       * (1 + CASE WHEN is_cold_item THEN cold_effect ELSE 0 END) AS ordered,
                   unif(key, {salt + 22}) < {cfg.p_cancel!r} AS cancelled,
                   (1 + (unif(key, {salt + 23}) < 0.3)::INTEGER)::INTEGER AS qty,
                   round(exp(3.0 + 0.6 * gauss(item_key, 30)), 2) AS price
            FROM draws
        ),
        events AS (
            SELECT *, 'impression' AS event_type, 0 AS dt, 0::INTEGER AS quantity,
                   0.0::DOUBLE AS value FROM outcomes
            UNION ALL
            SELECT *, 'click', 1, 0, 0.0::DOUBLE FROM outcomes WHERE clicked
            UNION ALL
            SELECT *, 'order', 2, qty, price * qty FROM outcomes WHERE clicked AND ordered
            UNION ALL
            SELECT *, 'cancel', 3, qty, price * qty FROM outcomes
                WHERE clicked AND ordered AND cancelled
        )
        SELECT '{experiment_id}' AS experiment_id, arm, user_id, request_id, ts + dt AS ts,
               day, item_id, position, event_type, quantity, value, is_cold_item,
               is_cold_user {ev_cohort_cols}
        FROM events
    """


def write_fake_run(out: str | os.PathLike, cfg: FakeRunConfig = FakeRunConfig(), *,
                   threads: int = 1) -> Path:
    """Write a complete fake run directory to `out` (replaced atomically); returns `out`.

    With the default `threads=1` the files are byte-identical across runs; with more
    threads DuckDB writes partitions in parallel, so the row order inside a file may vary
    (the rows themselves do not). Use more threads for benchmark-size runs.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        con = duckdb.connect()
        try:
            con.execute(f"SET threads = {int(threads)}")
            con.execute("SET enable_progress_bar = false")
            _macros(con, cfg.seed)
            con.execute(f"CREATE TEMP TABLE users AS {_users_sql(cfg)}")
            cohort_cols = "".join(f", cohort_{n}" for n in sorted(cfg.user_cohorts))
            con.execute(f"""
                COPY (SELECT '{cfg.experiment_id}' AS experiment_id, user_id AS unit_id, arm,
                             bucket, 0::BIGINT AS assigned_at, is_cold_user {cohort_cols}
                      FROM users ORDER BY unit_id)
                TO '{tmp / 'assignments.parquet'}' (FORMAT parquet, COMPRESSION zstd)
            """)
            windows = [(cfg.experiment_id, cfg.days, 0, False)]
            if cfg.pre_days > 0:
                windows.append((cfg.experiment_id + PRE_PERIOD_SUFFIX, cfg.pre_days, 500, True))
            counts: dict[str, int] = {"users": cfg.n_users}
            for exp_id, days, salt, pre in windows:
                con.execute(f"""
                    COPY ({_events_sql(cfg, exp_id, days, salt, pre)})
                    TO '{tmp / 'events'}'
                    (FORMAT parquet, PARTITION_BY (experiment_id, day), COMPRESSION zstd,
                     OVERWRITE_OR_IGNORE true, FILENAME_PATTERN 'part-{{i}}')
                """)
            src = f"read_parquet('{tmp / 'events'}/**/*.parquet', hive_partitioning = true)"
            counts.update(dict(con.execute(f"""
                SELECT experiment_id, count(*)::BIGINT FROM {src}
                GROUP BY experiment_id""").fetchall()))
            by_type: dict = {}
            for e, a, t, n in con.execute(f"SELECT experiment_id, arm, event_type, count(*) "
                                          f"FROM {src} GROUP BY ALL ORDER BY ALL").fetchall():
                by_type.setdefault(e, {}).setdefault(a, {})[t] = int(n)
            by_day: dict = {}
            for e, d, n in con.execute(f"SELECT experiment_id, day, count(*) FROM {src} "
                                       f"GROUP BY ALL ORDER BY ALL").fetchall():
                by_day.setdefault(e, {})[str(d)] = int(n)
            counts["events"] = by_type
            counts["events_per_day"] = by_day
        finally:
            con.close()
        manifest = {
            "experiment_id": cfg.experiment_id,
            "arms": dict(cfg.arms),
            "control": cfg.control,
            "seed": cfg.seed,
            "config": {"generator": "analysis.fake_events", **asdict(cfg)},
            "data_fingerprint": f"fake-{cfg.seed}",
            "counts": counts,
            "events_files": sorted(str(p.relative_to(tmp))
                                   for p in (tmp / "events").rglob("*.parquet")),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700; give the folder the usual mode
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

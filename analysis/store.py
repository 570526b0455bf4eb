"""The event store: a DuckDB database file of views over a run directory's Parquet.

`build_store(run_dir, db_path)` (re)creates, idempotently, views that read the run's files
in place (no copy of the data):
- `assignments`: `assignments.parquet` as written;
- `units`: the experiment's assigned units (`user_id`, `arm`, user-level cohort flags);
  every unit counts in the analysis, with zeros when it has no events;
- `events`: every event under `events/` (hive-partitioned by `experiment_id` and `day`,
  the partition values winning where the files also hold those columns; or a flat folder
  whose files hold both columns);
- `exp_events` / `pre_events`: the experiment's events and its pre-period
  (`<experiment_id>__pre`, the CUPED covariates).

The views hold paths relative to the DuckDB file's folder, so the run folder and the
analysis output can move together; `connect` sets `file_search_path` to that folder (do the
same when opening `events.duckdb` from another DuckDB client:
`SET file_search_path = '<folder of events.duckdb>'`).

DuckDB lets one process hold a database file for writing, so every use opens the file,
works and closes it (`connect`); temporary tables stay in memory, never in the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from quasid.core.layout import STATE_DIR
from quasid.core.schemas import ASSIGNMENTS, COHORT_PREFIX, PRE_PERIOD_SUFFIX, REPLICATE_COLUMN


class AnalysisError(ValueError):
    """Input the analysis cannot use: names the file, the field, the value and what was expected."""


MANIFEST_KEYS = ("experiment_id", "arms", "control")
CELL_SEPARATOR = "#r"
USER_FLAGS = ("is_cold_user",)
EVENT_FLAGS = ("is_cold_item", "is_cold_user")


@dataclass(frozen=True)
class Manifest:
    """What the analysis reads from `manifest.json`."""

    experiment_id: str
    arms: dict[str, float]
    control: str
    raw: dict

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        """Read and check `run_dir/manifest.json`."""
        path = run_dir / "manifest.json"
        if not path.exists():
            raise AnalysisError(f"{path}: file not found (expected the run's manifest with "
                                f"{', '.join(MANIFEST_KEYS)})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{path}: not valid JSON ({exc})") from exc
        missing = [k for k in MANIFEST_KEYS if k not in raw]
        if missing:
            raise AnalysisError(f"{path}: missing key(s) {missing} (expected at least "
                                f"{list(MANIFEST_KEYS)})")
        arms = raw["arms"]
        if (not isinstance(arms, dict) or len(arms) < 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in arms.values())):
            raise AnalysisError(f"{path}: 'arms' is {arms!r}; expected "
                                f"{{arm: allocation share > 0}} with two or more arms")
        if raw["control"] not in arms:
            raise AnalysisError(f"{path}: control {raw['control']!r} is not one of the arms "
                                f"{sorted(arms)}")
        return cls(str(raw["experiment_id"]), {str(k): float(v) for k, v in arms.items()},
                   str(raw["control"]), raw)


@dataclass(frozen=True)
class Segment:
    """A slice of the analysis: `all`, a user-level cohort (a column of `units`) or an
    event-level one (a column of the events, filtering which events count)."""

    name: str
    level: str  # "all" | "user" | "event"
    column: str | None = None


@dataclass(frozen=True)
class StoreInfo:
    """What the views hold: the experiment, its segments, whether a pre-period exists."""

    manifest: Manifest
    run_dir: Path
    db_path: Path
    segments: tuple[Segment, ...]
    has_pre_period: bool


@contextlib.contextmanager
def connect(db_path: Path, read_only: bool = False,
            threads: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the store file, yield the connection, always close it (DuckDB locks the file).

    `threads=1` makes every float sum happen in one fixed order (byte-identical results);
    more threads may change sums in their last bits from one run to the next.
    """
    con = duckdb.connect(str(db_path), read_only=read_only)
    try:
        con.execute("SET enable_progress_bar = false")
        # the views' paths are relative to the DuckDB file's folder (movable run folders)
        con.execute(f"SET file_search_path = {_sql_str(str(Path(db_path).resolve().parent))}")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        yield con
    finally:
        con.close()


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return {row[0]: row[1] for row in con.execute(f"DESCRIBE {relation}").fetchall()}


def _check_columns(found: dict[str, str], required: list[str], source: Path, what: str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise AnalysisError(f"{source}: missing column(s) {missing} for the {what} schema "
                            f"(found {sorted(found)})")


def _flag_columns(found: dict[str, str], fixed: tuple[str, ...]) -> list[str]:
    """Boolean cohort columns: the fixed flags present plus every `cohort_<name>`."""
    names = [c for c in fixed if c in found]
    names += sorted(c for c in found if c.startswith(COHORT_PREFIX))
    return [c for c in names if found[c] == "BOOLEAN"]


def segment_name(column: str) -> str:
    """`is_cold_item` → `cold_item`; `cohort_<name>` stays as it is."""
    return column.removeprefix("is_")


REQUIRED_EVENT_COLUMNS = ("experiment_id", "arm", "user_id", "day", "event_type")
"""Event columns every run needs; the others only when a chosen metric reads them."""
EVENT_KEY = ("request_id", "item_id", "event_type")
"""The events' unique key within an experiment (when the files carry these columns)."""


def _rel(path: Path, base: Path) -> str:
    """`path` relative to `base` (the folder of the DuckDB file): views resolve it through
    `file_search_path`, so a run folder and its analysis can be moved together."""
    return os.path.relpath(path, base)


def event_files(run_dir: Path) -> list[str]:
    """The run's event Parquet files, relative to `run_dir`, sorted."""
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "events").rglob("*.parquet"))


def events_source(run_dir: Path, base: Path | None = None, extra: str = "") -> str:
    """`read_parquet(...)` over the run's events: hive-partitioned folders
    (`experiment_id=<id>/day=<d>/`) or a flat folder whose files hold `experiment_id` and
    `day` themselves (a mix of both is an error)."""
    events_dir = run_dir / "events"
    files = event_files(run_dir)
    partitioned = ["experiment_id=" in f and "day=" in f for f in files]
    where = events_dir if base is None else Path(_rel(events_dir, base))
    glob = _sql_str(str(where / "**" / "*.parquet"))
    if all(partitioned):
        return (f"read_parquet({glob}, hive_partitioning = true, union_by_name = true, "
                f"hive_types = {{'experiment_id': VARCHAR, 'day': INTEGER}}{extra})")
    if any(partitioned):
        flat = [f for f, p in zip(files, partitioned) if not p][:3]
        raise AnalysisError(f"{events_dir}: mixes partition folders (experiment_id=<id>/"
                            f"day=<d>/) with files outside them, e.g. {flat}; expected one "
                            f"layout")
    return f"read_parquet({glob}, hive_partitioning = false, union_by_name = true{extra})"


def build_store(run_dir: str | Path, db_path: str | Path, *, cells: bool = False) -> StoreInfo:
    """Create (or replace) the views over `run_dir` in the DuckDB file `db_path`.

    Checks the manifest, the files' presence and columns, that assignments are unique per
    unit, that the experiment has events and every arm assigned units, then reconciles the
    events with the run's own records (`reconcile`). The views hold paths relative to
    `db_path`'s folder (`connect` sets DuckDB's `file_search_path` to it).
    `cells=True`: each (arm, training replicate) cell counts as an arm of its own, named
    `cell_name(arm, replicate)`, with the arm's share split evenly (the run's `replicate`
    column of assignments and events; the training-replicate analysis reads such a store,
    after the plain store has reconciled the run).
    """
    run_dir = Path(run_dir).resolve()
    db_path = Path(db_path)
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: run directory not found")
    manifest = Manifest.load(run_dir)
    assignments = run_dir / "assignments.parquet"
    if not assignments.exists():
        raise AnalysisError(f"{assignments}: file not found (expected the assignments Parquet)")
    events_dir = run_dir / "events"
    if not events_dir.is_dir() or not any(events_dir.rglob("*.parquet")):
        raise AnalysisError(f"{events_dir}: no event Parquet files (expected "
                            f"events/experiment_id=<id>/day=<d>/*.parquet, or flat files with "
                            f"experiment_id and day columns)")
    exp = manifest.experiment_id
    pre = exp + PRE_PERIOD_SUFFIX
    arm_sql = f"arm || '{CELL_SEPARATOR}' || CAST({REPLICATE_COLUMN} AS VARCHAR)" if cells else "arm"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    base = db_path.parent.resolve()
    source = events_source(run_dir, base)
    with connect(db_path) as con:
        con.execute(f"""
            CREATE OR REPLACE VIEW assignments AS
            SELECT * FROM read_parquet({_sql_str(_rel(assignments, base))})""")
        a_cols = _columns(con, "assignments")
        _check_columns(a_cols, ASSIGNMENTS.names, assignments, "assignments")
        _check_unique_units(con, assignments, exp)
        user_flags = _flag_columns(a_cols, USER_FLAGS)
        flag_sql = "".join(f", {c}" for c in user_flags)
        con.execute(f"""
            CREATE OR REPLACE VIEW units AS
            SELECT unit_id AS user_id, {arm_sql} AS arm {flag_sql} FROM assignments
            WHERE experiment_id = {_sql_str(exp)}""")
        con.execute(f"CREATE OR REPLACE VIEW events AS SELECT * FROM {source}")
        e_cols = _columns(con, "events")
        _check_columns(e_cols, list(REQUIRED_EVENT_COLUMNS), events_dir, "events")
        replace = f" REPLACE ({arm_sql} AS arm)" if cells else ""
        con.execute(f"""CREATE OR REPLACE VIEW exp_events AS
                        SELECT *{replace} FROM events WHERE experiment_id = {_sql_str(exp)}""")
        con.execute(f"""CREATE OR REPLACE VIEW pre_events AS
                        SELECT * FROM events WHERE experiment_id = {_sql_str(pre)}""")
        experiments = dict(con.execute(
            "SELECT experiment_id, count(*) FROM (SELECT DISTINCT experiment_id, day FROM events) "
            "GROUP BY ALL").fetchall())
        if exp not in experiments:
            raise AnalysisError(f"{events_dir}: no events for experiment {exp!r} (from "
                                f"manifest.json); found experiments {sorted(experiments)}")
        counts = dict(con.execute("SELECT arm, count(*) FROM units GROUP BY arm").fetchall())
        if cells:
            manifest = _cell_manifest(manifest, counts)
        _check_arms(manifest, counts, assignments)
        if not cells:
            reconcile(con, run_dir, manifest, e_cols)
        event_flags = [c for c in _flag_columns(e_cols, EVENT_FLAGS) if c not in user_flags]
    segments = (Segment("all", "all"),
                *(Segment(segment_name(c), "user", c) for c in user_flags),
                *(Segment(segment_name(c), "event", c) for c in event_flags))
    return StoreInfo(manifest, run_dir, db_path, segments, has_pre_period=pre in experiments)


def cell_name(arm: str, replicate: int) -> str:
    """The name of an (arm, training replicate) cell in a `cells=True` store."""
    return f"{arm}{CELL_SEPARATOR}{replicate}"


def _cell_manifest(manifest: Manifest, counts: dict[str, int]) -> Manifest:
    """The manifest with every arm replaced by its replicate cells (shares split evenly)."""
    cells: dict[str, float] = {}
    for arm, share in manifest.arms.items():
        mine = sorted((c for c in counts if c.startswith(arm + CELL_SEPARATOR)),
                      key=lambda c: int(c.rsplit(CELL_SEPARATOR, 1)[1]))
        cells.update({c: share / len(mine) for c in mine} if mine else {arm: share})
    return Manifest(manifest.experiment_id, cells, cell_name(manifest.control, 0), manifest.raw)


def _check_unique_units(con: duckdb.DuckDBPyConnection, source: Path, exp: str) -> None:
    """One assignment row per (experiment, unit): a repeated unit is an error naming it."""
    dup = con.execute(f"""
        SELECT unit_id, count(*) AS n, list(DISTINCT arm ORDER BY arm) FROM assignments
        WHERE experiment_id = {_sql_str(exp)} GROUP BY unit_id HAVING n > 1
        ORDER BY unit_id""").fetchall()
    if dup:
        shown = "; ".join(f"unit_id {u}: {n} rows, arm(s) {arms}" for u, n, arms in dup[:5])
        raise AnalysisError(f"{source}: column 'unit_id': {len(dup)} unit(s) of experiment "
                            f"{exp!r} appear in more than one row (expected one assignment "
                            f"per unit); first: {shown}")


SIMULATOR_COUNTS = {"impression": "impressions", "click": "clicks", "order": "orders",
                    "cancel": "cancels"}


def _shard_records(run_dir: Path, manifest: Manifest) -> list[str] | None:
    """The event files the simulator's shard records list (None: no shard records; every
    record of `n_shards` must be present)."""
    shards_dir = run_dir / STATE_DIR / "shards"
    n = manifest.raw.get("n_shards")
    if not shards_dir.is_dir() and n is None:
        return None
    records = sorted(shards_dir.glob("shard-*.json")) if shards_dir.is_dir() else []
    if isinstance(n, int) and n >= 1:
        expected = [shards_dir / f"shard-{s:05d}-of-{n:05d}.json" for s in range(n)]
        missing = [str(p.relative_to(run_dir)) for p in expected if not p.exists()]
        if missing:
            raise AnalysisError(f"{run_dir}: shard record(s) {missing[:5]} missing "
                                f"({len(missing)} of {n}; expected one per shard, as "
                                f"manifest.json's n_shards = {n} says): the run is incomplete")
        records = expected
    files: list[str] = []
    for path in records:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{path}: not valid JSON ({exc})") from exc
        files += [str(f) for f in record.get("files", [])]
    return files


def reconcile(con: duckdb.DuckDBPyConnection, run_dir: Path, manifest: Manifest,
              columns: dict[str, str]) -> None:
    """The events agree with the run's own records before anything is computed.

    - the event files are exactly those the shard records (`_simulator/shards/*.json`, all
      `n_shards` of them) or the manifest's `events_files` list: no stray, none missing;
    - per experiment, arm and event type, the event counts equal the manifest's
      (`counts.experiment` / `counts.pre` of the simulator, or `counts.events`), and per
      day `counts.events_per_day` where the manifest has it;
    - the events' unique key (`request_id`, `item_id`, `event_type`) is unique per
      experiment (where the files carry those columns).
    Runs without such records (external logs) are reconciled on what exists. Any mismatch
    is an `AnalysisError` naming the files."""
    events_dir = run_dir / "events"
    present = event_files(run_dir)
    listed = _shard_records(run_dir, manifest)
    source = "the shard records (_simulator/shards/*.json)"
    if listed is None and isinstance(manifest.raw.get("events_files"), list):
        listed, source = [str(f) for f in manifest.raw["events_files"]], "manifest.json's events_files"
    if listed is not None:
        stray = sorted(set(present) - set(listed))
        missing = sorted(set(listed) - set(present))
        if stray or missing:
            raise AnalysisError(
                f"{events_dir}: the event files disagree with {source}: "
                + (f"{len(stray)} file(s) not listed there: {stray[:5]}" if stray else "")
                + ("; " if stray and missing else "")
                + (f"{len(missing)} listed file(s) missing: {missing[:5]}" if missing else "")
                + " (expected exactly the listed files; remove strays or rerun the run)")
    exp = manifest.experiment_id
    counts = manifest.raw.get("counts") or {}
    expected: dict[tuple[str, str, str], int] = {}
    if isinstance(counts.get("events"), dict):
        for e_id, arms in counts["events"].items():
            for arm, by_type in arms.items():
                for t, n in by_type.items():
                    expected[(e_id, arm, t)] = int(n)
    else:
        pre_id = manifest.raw.get("pre_experiment_id") or exp + PRE_PERIOD_SUFFIX
        for period, e_id in (("experiment", exp), ("pre", pre_id)):
            for arm, row in (counts.get(period) or {}).items():
                if isinstance(row, dict):
                    for t, key in SIMULATOR_COUNTS.items():
                        if key in row:
                            expected[(e_id, arm, t)] = int(row[key])
    if expected:
        found = {(e, a, t): int(n) for e, a, t, n in con.execute(
            "SELECT experiment_id, arm, event_type, count(*) FROM events GROUP BY ALL"
        ).fetchall()}
        experiments = {k[0] for k in expected}
        keys = sorted(set(expected) | {k for k in found if k[0] in experiments})
        bad = [(k, expected.get(k, 0), found.get(k, 0)) for k in keys
               if expected.get(k, 0) != found.get(k, 0)]
        if bad:
            shown = "; ".join(f"{e}/{a}/{t}: {n_f} event(s) in the files, manifest says {n_e}"
                              for (e, a, t), n_e, n_f in bad[:6])
            raise AnalysisError(f"{events_dir}: event counts disagree with "
                                f"{run_dir / 'manifest.json'} (experiment/arm/event_type): "
                                f"{shown} (files: {present[:3]}{'...' if len(present) > 3 else ''};"
                                f" a stray, missing or edited event file)")
    per_day = counts.get("events_per_day")
    if isinstance(per_day, dict):
        found_d = {(e, int(d)): int(n) for e, d, n in con.execute(
            "SELECT experiment_id, day, count(*) FROM events GROUP BY ALL").fetchall()}
        exp_d = {(e, int(d)): int(n) for e, days in per_day.items() for d, n in days.items()}
        keys = sorted(set(exp_d) | {k for k in found_d if k[0] in per_day})
        bad_d = [(k, exp_d.get(k, 0), found_d.get(k, 0)) for k in keys
                 if exp_d.get(k, 0) != found_d.get(k, 0)]
        if bad_d:
            shown = "; ".join(f"{e} day {d}: {n_f} in the files, manifest says {n_e}"
                              for (e, d), n_e, n_f in bad_d[:6])
            raise AnalysisError(f"{events_dir}: per-day event counts disagree with "
                                f"{run_dir / 'manifest.json'}: {shown}")
    if all(c in columns for c in EVENT_KEY):
        key = ", ".join(EVENT_KEY)
        dup = con.execute(f"""
            SELECT experiment_id, {key}, count(*) AS n FROM events
            GROUP BY experiment_id, {key} HAVING n > 1 ORDER BY ALL LIMIT 5""").fetchall()
        if dup:
            cond = " OR ".join(
                "(" + " AND ".join([f"experiment_id = {_sql_str(str(r[0]))}"]
                                   + [f"{c}::VARCHAR = {_sql_str(str(v))}" for c, v in
                                      zip(EVENT_KEY, r[1:4])]) + ")" for r in dup)
            files = [f for (f,) in con.execute(
                f"SELECT DISTINCT filename FROM {events_source(run_dir, None, ', filename = true')} "
                f"WHERE {cond} ORDER BY 1 LIMIT 5"
            ).fetchall()]
            shown = "; ".join(f"{r[0]} request_id={r[1]} item_id={r[2]} event_type={r[3]!r} "
                              f"x{r[4]}" for r in dup)
            raise AnalysisError(f"{events_dir}: duplicate events: the unique key "
                                f"({key}) repeats, e.g. {shown}; in file(s) "
                                f"{[os.path.relpath(f, run_dir) for f in files]} (expected each "
                                f"event once: a copied file or a double import)")


def _check_arms(manifest: Manifest, counts: dict[str, int], source: Path) -> None:
    if not counts:
        raise AnalysisError(f"{source}: no units assigned to experiment {manifest.experiment_id!r}")
    missing = [a for a in manifest.arms if a not in counts]
    if missing:
        raise AnalysisError(f"{source}: arm(s) {missing} of manifest.json have no assigned units "
                            f"(assigned per arm: {counts})")
    unknown = [a for a in counts if a not in manifest.arms]
    if unknown:
        raise AnalysisError(f"{source}: column 'arm' holds {unknown}, which manifest.json does not "
                            f"list (expected one of {sorted(manifest.arms)})")

"""The event store: a DuckDB database file of views over a run directory's Parquet.

`build_store(run_dir, db_path)` (re)creates, idempotently, views that read the run's files
in place (no copy of the data):
- `assignments`: `assignments.parquet` as written;
- `units`: the experiment's assigned units (`user_id`, `arm`, user-level cohort flags);
  every unit counts in the analysis, with zeros when it has no events;
- `events`: every event under `events/` (hive-partitioned by `experiment_id` and `day`;
  the partition values win where the files also hold those columns);
- `exp_events` / `pre_events`: the experiment's events and its pre-period
  (`<experiment_id>__pre`, the CUPED covariates).

DuckDB lets one process hold a database file for writing, so every use opens the file,
works and closes it (`connect`); temporary tables stay in memory, never in the file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from quasid.core.schemas import (
    ASSIGNMENTS,
    COHORT_PREFIX,
    EVENTS,
    PRE_PERIOD_SUFFIX,
    REPLICATE_COLUMN,
)


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


def build_store(run_dir: str | Path, db_path: str | Path, *, cells: bool = False) -> StoreInfo:
    """Create (or replace) the views over `run_dir` in the DuckDB file `db_path`.

    Checks what can be checked without scanning the data: the manifest, the files' presence
    and columns, that the experiment has events, and that every arm has assigned units.
    `cells=True`: each (arm, training replicate) cell counts as an arm of its own, named
    `cell_name(arm, replicate)`, with the arm's share split evenly (the run's `replicate`
    column of assignments and events; the training-replicate analysis reads such a store).
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
                            f"events/experiment_id=<id>/day=<d>/*.parquet)")
    exp = manifest.experiment_id
    pre = exp + PRE_PERIOD_SUFFIX
    arm_sql = f"arm || '{CELL_SEPARATOR}' || CAST({REPLICATE_COLUMN} AS VARCHAR)" if cells else "arm"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with connect(db_path) as con:
        con.execute(f"""
            CREATE OR REPLACE VIEW assignments AS
            SELECT * FROM read_parquet({_sql_str(str(assignments))})""")
        a_cols = _columns(con, "assignments")
        _check_columns(a_cols, ASSIGNMENTS.names, assignments, "assignments")
        user_flags = _flag_columns(a_cols, USER_FLAGS)
        flag_sql = "".join(f", {c}" for c in user_flags)
        con.execute(f"""
            CREATE OR REPLACE VIEW units AS
            SELECT unit_id AS user_id, {arm_sql} AS arm {flag_sql} FROM assignments
            WHERE experiment_id = {_sql_str(exp)}""")
        glob = _sql_str(str(events_dir / "**" / "*.parquet"))
        con.execute(f"""
            CREATE OR REPLACE VIEW events AS
            SELECT * FROM read_parquet(
                {glob}, hive_partitioning = true, union_by_name = true,
                hive_types = {{'experiment_id': VARCHAR, 'day': INTEGER}})""")
        e_cols = _columns(con, "events")
        _check_columns(e_cols, EVENTS.names, events_dir, "events")
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

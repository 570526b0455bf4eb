"""`import_logs`: external A/B event logs (Parquet or CSV, one row per event) into a run directory.

The analysis reads only run-directory files (`assignments.parquet`, `events/`,
`manifest.json`), so logs from a warehouse become analysable by writing those files. The
user maps their columns (`unit`, `arm`, `time`, `event` required; `value`, `item`,
`position`, `request`, `propensity`, `segments` optional) and states the intended split
(`shares`, default equal) and the control arm.

What external logs lack is filled with neutral values, each reported in the summary:

| column | filled with |
| --- | --- |
| `experiment_id` | the `experiment_id` argument (default `imported`) |
| `user_id` | the unit column; non-integer ids are numbered 0.. in sorted order (`unit_ids.parquet`) |
| `ts`, `day` | the time column in seconds (datetimes, dates, integer seconds or ISO strings); day 0 = the earliest event's UTC day |
| `request_id` | the `request` column, else one request per (unit, ts) |
| `item_id` | the `item` column (non-integer ids numbered like units), else −1, −2, … per request and event type (unknown item) |
| `position` | the `position` column, else 0 |
| `value` | the `value` column, else 0 |
| `quantity` | 1 on order and cancel rows, else 0 |
| `cohort_<segment>` | a Boolean flag per `segment` column (Boolean or 0/1 as is; other columns: one flag per value) |
| `propensity` | the `propensity` column (the logging policy's probability of the shown item, for `quasid ope`) |
| assignments | one row per unit: the `assignments` file's units (units without events count as zeros) and every unit with events; `bucket` 0, `assigned_at` the unit's first event ts (0 without events) |

`is_cold_item` / `is_cold_user` are not invented: metrics that read them are then not
applicable. Nothing is written unless every check passes: unknown event types (none of the
metrics reads them), duplicate events, units in two arms, assignment rows that repeat or
contradict the events, arms missing from the shares; each error names the file, the column,
the value and what was expected. The run directory appears at once (a staging folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analysis.metrics import REGISTRY, Metric, event_types_read, load_metrics_file
from analysis.store import AnalysisError
from quasid.core.config import ConfigError
from quasid.core.hashing import file_digest
from quasid.core.io import staged_dir
from quasid.core.schemas import ASSIGNMENTS, COHORT_PREFIX, EVENTS, Schema, validate

DAY = 86_400
IMPORT_SCHEMA = Schema("events", tuple(c for c in EVENTS.columns if c.name not in (
    "is_cold_item", "is_cold_user", "event_type")) + tuple(
    c.__class__(c.name, c.dtype) for c in EVENTS.columns if c.name == "event_type"),
    unique=EVENTS.unique)
"""The imported events: the events schema without the cold flags (not invented) and with
event types checked against the metrics instead of the simulator's four."""


@dataclass(frozen=True)
class Mapping:
    """Which columns of the logs hold what (None: absent)."""

    unit: str
    arm: str
    time: str
    event: str
    value: str | None = None
    item: str | None = None
    position: str | None = None
    request: str | None = None
    propensity: str | None = None
    segments: tuple[str, ...] = ()


@dataclass
class ImportSummary:
    """What `import_logs` wrote and what it filled in."""

    run_dir: Path
    experiment_id: str
    arms: dict[str, float]
    control: str
    units: dict[str, int]
    events: int
    days: int
    filled: list[str] = field(default_factory=list)


def _read(path: Path, what: str) -> pl.DataFrame:
    if not path.is_file():
        raise AnalysisError(f"{path}: file not found (expected the {what}, Parquet or CSV)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",",
                               infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise AnalysisError(f"{path}: cannot be read as {suffix[1:]} ({exc})") from None
    raise AnalysisError(f"{path}: unknown file type {suffix!r} (expected .parquet, .csv or .tsv)")


def _need(frame: pl.DataFrame, path: Path, column: str, option: str) -> None:
    if column not in frame.columns:
        raise AnalysisError(f"{path}: no column {column!r} (given by {option}); found "
                            f"{frame.columns}")


def _show(frame: pl.DataFrame, mask: pl.Series, cols: list[str], n: int = 3) -> str:
    rows = frame.with_row_index("row").filter(mask).head(n)
    return "; ".join("row " + str(r["row"]) + " (" + ", ".join(f"{c}={r[c]!r}" for c in cols)
                     + ")" for r in rows.iter_rows(named=True))


def _no_nulls(frame: pl.DataFrame, path: Path, column: str) -> None:
    mask = frame[column].is_null()
    if mask.any():
        raise AnalysisError(f"{path}: column {column!r}: {int(mask.sum())} empty value(s) "
                            f"(expected a value in every row); first: "
                            f"{_show(frame, mask, [column])}")


def _seconds(frame: pl.DataFrame, path: Path, column: str) -> pl.Series:
    """The time column as integer seconds since the epoch."""
    s = frame[column]
    if s.dtype == pl.String:
        parsed = s.str.to_datetime(strict=False, time_zone="UTC")
        bad = parsed.is_null() & s.is_not_null()
        if bad.any():
            raise AnalysisError(f"{path}: column {column!r}: {int(bad.sum())} value(s) are not "
                                f"dates or times (expected ISO 8601 such as 2024-05-01 or "
                                f"2024-05-01T12:00:00, or integer seconds); first: "
                                f"{_show(frame, bad, [column])}")
        s = parsed
    if s.dtype == pl.Date:
        s = s.cast(pl.Datetime("ms"))
    if isinstance(s.dtype, pl.Datetime):
        return (s.dt.epoch("ms") // 1000).cast(pl.Int64)
    if s.dtype.is_integer():
        return s.cast(pl.Int64)
    raise AnalysisError(f"{path}: column {column!r} has dtype {s.dtype} (expected datetimes, "
                        f"dates, ISO strings or integer seconds)")


def _ids(series: pl.Series) -> tuple[pl.Series, pl.DataFrame | None]:
    """Integer ids as they are; others numbered 0.. in sorted order (with the mapping)."""
    if series.dtype.is_integer():
        return series.cast(pl.Int64), None
    keys = series.cast(pl.String)
    uniq = keys.unique().sort()
    mapping = pl.DataFrame({"key": uniq, "id": pl.int_range(len(uniq), eager=True)})
    ids = pl.DataFrame({"key": keys}).join(mapping, on="key", how="left", maintain_order="left")
    return ids["id"].cast(pl.Int64), mapping


def _metrics(metrics_file: str | Path | None) -> list[Metric]:
    if metrics_file is None:
        return list(REGISTRY.values())
    try:
        return load_metrics_file(metrics_file)
    except ConfigError as exc:
        raise AnalysisError(str(exc)) from None


def parse_shares(text: str | None, arms: list[str]) -> dict[str, float]:
    """`a=0.5,b=0.5` → {a: 0.5, b: 0.5}; None: equal shares of the arms."""
    if not text:
        return {a: 1.0 / len(arms) for a in arms}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not sep or not name.strip() or not share > 0:
            raise AnalysisError(f"--shares: {part!r} (expected arm=share with share > 0, e.g. "
                                f"control=0.5,treatment=0.5)")
        out[name.strip()] = share
    return out


def import_logs(events: str | Path, out: str | Path, mapping: Mapping, *,
                control: str | None = None, shares: str | dict[str, float] | None = None,
                assignments: str | Path | None = None, assignment_unit: str | None = None,
                assignment_arm: str | None = None, experiment_id: str = "imported",
                metrics_file: str | Path | None = None) -> ImportSummary:
    """Write the run directory `out` from an event log; see the module docstring."""
    events, out = Path(events), Path(out)
    if out.exists() and any(out.iterdir()):
        raise AnalysisError(f"{out}: not empty (expected a new or empty folder for the run "
                            f"directory; events of two imports would mix)")
    if not experiment_id or experiment_id.endswith("__pre"):
        raise AnalysisError(f"experiment id {experiment_id!r}: expected a non-empty name not "
                            f"ending in __pre")
    frame = _read(events, "event log")
    if frame.height == 0:
        raise AnalysisError(f"{events}: no rows (expected one row per event)")
    options = {"unit": "--unit", "arm": "--arm", "time": "--time", "event": "--event",
               "value": "--value", "item": "--item", "position": "--position",
               "request": "--request", "propensity": "--propensity"}
    for key, option in options.items():
        col = getattr(mapping, key)
        if col is not None:
            _need(frame, events, col, option)
    for col in mapping.segments:
        _need(frame, events, col, "--segment")
    for col in (mapping.unit, mapping.arm, mapping.time, mapping.event):
        _no_nulls(frame, events, col)
    filled: list[str] = []

    # event types: every one must be read by a metric (a typo is named)
    known = event_types_read(_metrics(metrics_file))
    types = frame[mapping.event].cast(pl.String)
    unknown = sorted(set(types.unique().to_list()) - set(known))
    if unknown:
        counts = {t: int((types == t).sum()) for t in unknown}
        raise AnalysisError(
            f"{events}: column {mapping.event!r}: " + "; ".join(
                f"event_type {t!r} is not an event any metric reads ({counts[t]} row(s))"
                for t in unknown)
            + f"; known: {', '.join(known)} (rename the events, or define a metric that reads "
              f"them in a --metrics file)")

    ts = _seconds(frame, events, mapping.time)
    user_id, unit_map = _ids(frame[mapping.unit])
    if unit_map is not None:
        filled.append(f"unit ids ({mapping.unit!r}, {frame[mapping.unit].dtype}) numbered 0.. "
                      f"in sorted order: unit_ids.parquet maps them back")
    arm = frame[mapping.arm].cast(pl.String)
    ev = pl.DataFrame({"experiment_id": pl.Series([experiment_id] * frame.height,
                                                   dtype=pl.String),
                       "arm": arm, "user_id": user_id, "ts": ts, "event_type": types})
    day0 = int(ts.min()) // DAY if frame.height else 0
    ev = ev.with_columns(((pl.col("ts") // DAY) - day0).cast(pl.Int32).alias("day"))
    filled.append(f"day = UTC day of {mapping.time!r} minus the first ({day0 * DAY} s): "
                  f"{int(ev['day'].max()) + 1 if frame.height else 0} day(s)")
    if mapping.value is not None:
        v = frame[mapping.value]
        if not v.dtype.is_numeric():
            raise AnalysisError(f"{events}: column {mapping.value!r} has dtype {v.dtype} "
                                f"(expected numbers)")
        v = v.cast(pl.Float64)
        bad = v.is_null() | v.is_nan() | v.is_infinite() | (v < 0)
        if bad.any():
            raise AnalysisError(f"{events}: column {mapping.value!r}: {int(bad.sum())} value(s) "
                                f"empty, NaN, infinite or negative (expected a finite number "
                                f">= 0); first: {_show(frame, bad, [mapping.value])}")
        ev = ev.with_columns(v.alias("value"))
    else:
        ev = ev.with_columns(pl.lit(0.0).alias("value"))
        filled.append("value = 0 (no --value)")
    if mapping.item is not None:
        _no_nulls(frame, events, mapping.item)
        item, item_map = _ids(frame[mapping.item])
        ev = ev.with_columns(item.alias("item_id"))
        if item_map is not None:
            filled.append(f"item ids ({mapping.item!r}) numbered 0.. in sorted order: "
                          f"item_ids.parquet maps them back")
    else:
        item_map = None
    if mapping.position is not None:
        _no_nulls(frame, events, mapping.position)
        ev = ev.with_columns(frame[mapping.position].cast(pl.Int16).alias("position"))
    else:
        ev = ev.with_columns(pl.lit(0, dtype=pl.Int16).alias("position"))
        filled.append("position = 0 (no --position)")
    if mapping.request is not None:
        _no_nulls(frame, events, mapping.request)
        req, _ = _ids(frame[mapping.request])
        ev = ev.with_columns(req.alias("request_id"))
    else:
        ev = ev.with_columns(pl.struct("user_id", "ts").rank("dense").cast(pl.Int64)
                             .sub(1).alias("request_id"))
        filled.append("request_id = one request per (unit, time)")
    if mapping.propensity is not None:
        p = frame[mapping.propensity].cast(pl.Float64)
        is_imp = ev["event_type"] == "impression"
        bad = is_imp & (p.is_null() | p.is_nan() | ~((p > 0) & (p <= 1)))
        if bad.any():
            raise AnalysisError(f"{events}: column {mapping.propensity!r}: {int(bad.sum())} "
                                f"impression row(s) without a propensity in (0, 1] (expected "
                                f"the logging policy's probability of the shown item); first: "
                                f"{_show(frame, bad, [mapping.propensity, mapping.event])}")
        ev = ev.with_columns(p.fill_null(0.0).fill_nan(0.0).alias("propensity"))
    for col in mapping.segments:
        s = frame[col]
        if s.dtype == pl.Boolean or (s.dtype.is_integer() and set(s.unique().to_list()) <= {0, 1}):
            ev = ev.with_columns(s.cast(pl.Boolean).fill_null(False).alias(
                f"{COHORT_PREFIX}{_flag_name(col)}"))
        else:
            values = s.cast(pl.String).unique().drop_nulls().sort().to_list()
            if len(values) > 50:
                raise AnalysisError(f"{events}: column {col!r} (--segment) has {len(values)} "
                                    f"distinct values (expected a Boolean, 0/1 or at most 50 "
                                    f"values, each becoming a cohort flag)")
            for value in values:
                ev = ev.with_columns((s.cast(pl.String) == value).fill_null(False).alias(
                    f"{COHORT_PREFIX}{_flag_name(col)}_{_flag_name(value)}"))
        filled.append(f"segment {col!r} -> event-level cohort flag(s)")

    # duplicate events: the same unit, time, event (and item, position, request) twice
    ident = [c for c in ("user_id", "ts", "event_type", "item_id", "position", "request_id")
             if c in ev.columns and (c != "request_id" or mapping.request is not None)]
    dup = ev.select(pl.struct(ident).is_duplicated()).to_series()
    if dup.any():
        raise AnalysisError(f"{events}: {int(dup.sum())} row(s) are duplicate events (the same "
                            f"{', '.join(ident)}; expected each event once); first: "
                            + _show(frame, dup, [mapping.unit, mapping.time, mapping.event]))
    if "item_id" not in ev.columns:
        ev = ev.with_columns((-1 - pl.int_range(pl.len()).over("request_id", "event_type"))
                             .cast(pl.Int64).alias("item_id"))
        filled.append("item_id = -1, -2, ... per request and event type (no --item: unknown "
                      "items)")
    ev = ev.with_columns(pl.when(pl.col("event_type").is_in(["order", "cancel"])).then(1)
                         .otherwise(0).cast(pl.Int32).alias("quantity"))
    filled.append("quantity = 1 on order and cancel rows, else 0")

    # one arm per unit
    arms_per_unit = ev.group_by("user_id").agg(pl.col("arm").unique().sort().alias("arms"))
    multi = arms_per_unit.filter(pl.col("arms").list.len() > 1).sort("user_id")
    if multi.height:
        shown = "; ".join(f"unit {_unit_key(u, unit_map)}: arms {a}"
                          for u, a in multi.head(5).iter_rows())
        raise AnalysisError(f"{events}: column {mapping.arm!r}: {multi.height} unit(s) have "
                            f"events in more than one arm (expected one arm per unit); "
                            f"first: {shown}")
    units = ev.group_by("user_id").agg(pl.col("arm").first(), pl.col("ts").min()
                                       .alias("assigned_at"))
    if assignments is not None:
        units, unit_map = _merge_assignments(Path(assignments), units, assignment_unit or mapping.unit,
                                   assignment_arm or mapping.arm, unit_map, events)
        filled.append(f"assignments from {Path(assignments).name}: units without events count "
                      f"as zeros")
    arms_found = sorted(units["arm"].unique().to_list())
    share_map = shares if isinstance(shares, dict) else parse_shares(shares, arms_found)
    if not isinstance(shares, (str, dict)) or not shares:
        filled.append(f"shares equal over the arms found ({', '.join(arms_found)}): pass "
                      f"--shares with the intended split")
    missing = [a for a in arms_found if a not in share_map]
    if missing or len(share_map) < 2:
        raise AnalysisError(f"--shares: arm(s) {missing or arms_found} found in the logs "
                            f"(column {mapping.arm!r}) {'are not in' if missing else 'vs'} "
                            f"the shares {share_map} (expected a share for every arm, two or "
                            f"more arms)")
    control = control if control is not None else arms_found[0]
    if control not in share_map:
        raise AnalysisError(f"--control: {control!r} is not an arm of the logs "
                            f"{sorted(share_map)}")
    if not isinstance(control, str) or control == "":
        raise AnalysisError("--control: expected an arm name")

    ev = ev.sort("day", "request_id", "position", "event_type", "item_id")
    cols = IMPORT_SCHEMA.names + [c for c in ev.columns if c not in IMPORT_SCHEMA.names]
    ev = ev.select(cols)
    try:
        validate(ev, IMPORT_SCHEMA, str(events))
    except ValueError as exc:  # ContractError
        raise AnalysisError(str(exc)) from None
    assign = units.sort("user_id").select(
        pl.lit(experiment_id).alias("experiment_id"), pl.col("user_id").alias("unit_id"),
        pl.col("arm"), pl.lit(0, dtype=pl.Int32).alias("bucket"),
        pl.col("assigned_at").fill_null(0).cast(pl.Int64))
    validate(assign, ASSIGNMENTS, "assignments")

    by_type: dict = {}
    for a, t, n in ev.group_by("arm", "event_type").len().sort("arm", "event_type").iter_rows():
        by_type.setdefault(a, {})[t] = int(n)
    per_day = {str(d): int(n) for d, n in ev.group_by("day").len().sort("day").iter_rows()}
    days = sorted(ev["day"].unique().to_list())
    files = []
    with staged_dir(out) as tmp:
        for d in days:
            rel = f"events/experiment_id={experiment_id}/day={d}/part-0.parquet"
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            ev.filter(pl.col("day") == d).drop("experiment_id", "day").write_parquet(
                path, compression="zstd", statistics=True)
            files.append(rel)
        assign.write_parquet(tmp / "assignments.parquet", compression="zstd")
        if unit_map is not None:
            unit_map.rename({"key": "unit", "id": "unit_id"}).write_parquet(
                tmp / "unit_ids.parquet")
        if item_map is not None:
            item_map.rename({"key": "item", "id": "item_id"}).write_parquet(
                tmp / "item_ids.parquet")
        n_units = dict(assign.group_by("arm").len().sort("arm").iter_rows())
        manifest = {
            "experiment_id": experiment_id, "arms": share_map, "control": control, "seed": 0,
            "source": "import-logs",
            "config": {"events": events.name, "mapping": {k: v for k, v in
                                                         vars(mapping).items()},
                       "assignments": Path(assignments).name if assignments else None,
                       "metrics_file": str(metrics_file) if metrics_file else None},
            "data_fingerprint": file_digest(events),
            "days": len(range(days[-1] + 1)) if days else 0,
            "counts": {"users": {a: int(n) for a, n in n_units.items()},
                       "events": {experiment_id: by_type},
                       "events_per_day": {experiment_id: per_day}},
            "events_files": files,
            "filled": filled,
        }
        if mapping.propensity is not None:
            manifest["propensity"] = "propensity"
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True)
                                           + "\n")
    return ImportSummary(out, experiment_id, share_map, control,
                         {a: int(n) for a, n in n_units.items()}, ev.height,
                         len(days), filled)


def _flag_name(text: str) -> str:
    import re
    name = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return name or "x"


def _unit_key(uid: int, unit_map: pl.DataFrame | None) -> object:
    if unit_map is None:
        return uid
    return unit_map.filter(pl.col("id") == uid)["key"][0]


def _merge_assignments(path: Path, units: pl.DataFrame, unit_col: str, arm_col: str,
                       unit_map: pl.DataFrame | None, events: Path
                       ) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Units of an assignments file joined with those of the events: each unit once, in
    one arm, the same arm in both files."""
    table = _read(path, "assignments")
    _need(table, path, unit_col, "--unit / --assignments-unit")
    _need(table, path, arm_col, "--arm / --assignments-arm")
    _no_nulls(table, path, unit_col)
    _no_nulls(table, path, arm_col)
    dup = table.select(pl.col(unit_col).is_duplicated()).to_series()
    if dup.any():
        n_units = table.filter(dup)[unit_col].n_unique()
        raise AnalysisError(f"{path}: column {unit_col!r}: {n_units} unit(s) appear in more "
                            f"than one row ({int(dup.sum())} rows; expected one assignment row "
                            f"per unit); first: {_show(table, dup, [unit_col, arm_col])}")
    keys = table[unit_col]
    if unit_map is None:
        if not keys.dtype.is_integer():
            raise AnalysisError(f"{path}: column {unit_col!r} has dtype {keys.dtype} while the "
                                f"events' unit ids are integers (expected the same ids in "
                                f"both files)")
        ids = keys.cast(pl.Int64)
    else:
        known = unit_map["key"]
        extra = keys.cast(pl.String).filter(~keys.cast(pl.String).is_in(known.implode()))
        start = len(known)
        full = pl.concat([unit_map, pl.DataFrame({"key": extra.unique().sort(),
                                                   "id": pl.int_range(start, start + extra.n_unique(),
                                                                      eager=True)})])
        unit_map = full  # the mapping now covers the assignments' units too
        ids = pl.DataFrame({"key": keys.cast(pl.String)}).join(
            full, on="key", how="left", maintain_order="left")["id"].cast(pl.Int64)
    table = pl.DataFrame({"user_id": ids, "arm_a": table[arm_col].cast(pl.String)})
    both = units.join(table, on="user_id", how="full", coalesce=True)
    clash = both.filter(pl.col("arm").is_not_null() & pl.col("arm_a").is_not_null()
                        & (pl.col("arm") != pl.col("arm_a"))).sort("user_id")
    if clash.height:
        shown = "; ".join(f"unit {_unit_key(u, unit_map)}: {a_e!r} in the events, {a_a!r} in "
                          f"the assignments" for u, a_e, _, a_a in clash.head(5).iter_rows())
        raise AnalysisError(f"{path} vs {events}: {clash.height} unit(s) have another arm in "
                            f"the assignments than in the events (ids colliding across logs? "
                            f"expected the same unit ids and arms in both); first: {shown}")
    return both.select("user_id", pl.coalesce("arm", "arm_a").alias("arm"),
                       pl.col("assigned_at").fill_null(0)), unit_map

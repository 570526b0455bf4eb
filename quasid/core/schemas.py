"""Data contracts: the schemas every file between two steps must follow, and their validator.

One schema per file kind (items, interactions, sid table, assignments, events; see docs/design.md).
`validate` checks a polars frame against a schema and raises `ContractError` naming the
source (file), the column, the first offending rows and what was expected. Nothing is
coerced: a wrong dtype is an error, not a cast. `write_parquet` validates first and writes
through a temporary name, so bad input never leaves a partial file behind.

Conventions between the simulator and the analysis (beyond the columns below):
- user-level cohorts travel in `assignments.parquet` as extra boolean columns
  (`is_cold_user`, and `cohort_<name>` for user-defined cohorts), so users without events
  still count (as zeros) in their cohort; events carry `is_cold_item`, `is_cold_user` and
  event-level `cohort_<name>` flags;
- the pre-period (every user on control, for CUPED covariates) is written as events of the
  experiment `<experiment_id>__pre` (see `PRE_PERIOD_SUFFIX`), with the same user ids;
- `day` counts from 0 at the first day of the experiment's window (or of its pre-period);
- `manifest.json` holds at least `experiment_id`, `arms` (`{arm: allocation share}`),
  `control` (the control arm's name), `seed`, `config`, `data_fingerprint` and `counts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from quasid.core.io import write_frame_atomic

MAX_SHOWN_ROWS = 5


class ContractError(ValueError):
    """Input that breaks a data contract: names the source, the column, the rows and the rule."""


@dataclass(frozen=True)
class Check:
    """A row-level rule: `expr` is True on valid rows; `expected` says it in words."""

    expr: pl.Expr
    expected: str


@dataclass(frozen=True)
class Column:
    """One column: its exact dtype, whether nulls are allowed, and extra row rules."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Schema:
    """A file kind: its columns, its unique key and the rules spanning columns."""

    name: str
    columns: tuple[Column, ...]
    unique: tuple[str, ...] = ()
    equal_list_lengths: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        """Column names in schema order."""
        return [c.name for c in self.columns]

    @property
    def polars_schema(self) -> dict[str, pl.DataType]:
        """`{name: dtype}`, for building empty or typed frames."""
        return {c.name: c.dtype for c in self.columns}

    def empty(self) -> pl.DataFrame:
        """An empty frame with this schema."""
        return pl.DataFrame(schema=self.polars_schema)


def _one_of(column: str, values: tuple[str, ...]) -> Check:
    return Check(pl.col(column).is_in(list(values)), f"one of {', '.join(values)}")


def _non_negative(column: str) -> Check:
    return Check(pl.col(column) >= 0, ">= 0")


EVENT_TYPES = ("impression", "click", "order", "cancel")
PRE_PERIOD_SUFFIX = "__pre"
COHORT_PREFIX = "cohort_"
REPLICATE_COLUMN = "replicate"
"""Optional Int16 column of assignments and events: the unit's training-replicate cell."""

ITEMS = Schema(
    "items",
    (
        Column("item_id", pl.Int64(), checks=(_non_negative("item_id"),)),
        Column("content", pl.List(pl.Float32())),
        Column("category", pl.String(), nullable=True),
        Column("price", pl.Float64(), checks=(Check(pl.col("price") > 0, "> 0"),)),
        Column("is_cold", pl.Boolean()),
    ),
    unique=("item_id",),
    equal_list_lengths=("content",),
)

INTERACTIONS = Schema(
    "interactions",
    (
        Column("user_id", pl.Int64(), checks=(_non_negative("user_id"),)),
        Column("item_id", pl.Int64(), checks=(_non_negative("item_id"),)),
        Column("ts", pl.Int64()),
        Column("event", pl.String()),
    ),
    unique=("user_id", "item_id", "ts"),
)

SID_TABLE = Schema(
    "sid table",
    (
        Column("item_id", pl.Int64(), checks=(_non_negative("item_id"),)),
        Column("sid", pl.List(pl.Int16())),
        Column("tokenizer", pl.String()),
        Column("collision_rank", pl.Int16(), checks=(_non_negative("collision_rank"),)),
    ),
    unique=("item_id",),
    equal_list_lengths=("sid",),
)

ASSIGNMENTS = Schema(
    "assignments",
    (
        Column("experiment_id", pl.String()),
        Column("unit_id", pl.Int64()),
        Column("arm", pl.String()),
        Column("bucket", pl.Int32(), checks=(_non_negative("bucket"),)),
        Column("assigned_at", pl.Int64()),
    ),
    unique=("experiment_id", "unit_id"),
)

EVENTS = Schema(
    "events",
    (
        Column("experiment_id", pl.String()),
        Column("arm", pl.String()),
        Column("user_id", pl.Int64()),
        Column("request_id", pl.Int64()),
        Column("ts", pl.Int64()),
        Column("day", pl.Int32(), checks=(_non_negative("day"),)),
        Column("item_id", pl.Int64()),
        Column("position", pl.Int16(), checks=(_non_negative("position"),)),
        Column("event_type", pl.String(), checks=(_one_of("event_type", EVENT_TYPES),)),
        Column("quantity", pl.Int32(), checks=(_non_negative("quantity"),)),
        Column("value", pl.Float64(), checks=(_non_negative("value"),)),
        Column("is_cold_item", pl.Boolean()),
        Column("is_cold_user", pl.Boolean()),
    ),
    unique=("request_id", "item_id", "event_type"),
)



def _show_rows(frame: pl.DataFrame, mask: pl.Series, columns: list[str]) -> str:
    """The first offending rows as 'row N: col=value, ...' (row numbers are 0-based)."""
    bad = frame.select(columns).with_row_index("__row").filter(mask).head(MAX_SHOWN_ROWS)
    parts = []
    for rec in bad.iter_rows(named=True):
        row = rec.pop("__row")
        values = ", ".join(f"{k}={_short(v)}" for k, v in rec.items())
        parts.append(f"row {row}: {values}")
    return "; ".join(parts)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(source: str, column: str, count: int, expected: str, rows: str) -> ContractError:
    plural = "row" if count == 1 else "rows"
    return ContractError(
        f"{source}: column '{column}': {count} {plural} break the rule (expected {expected}); "
        f"first offending {rows}"
    )


def validate(frame: pl.DataFrame, schema: Schema, source: str = "<frame>") -> pl.DataFrame:
    """Check `frame` against `schema`; return it unchanged or raise `ContractError`.

    Checks, in order: missing columns, exact dtypes, nulls, NaN (also inside list
    columns), each column's row rules, equal list lengths, and the unique key. Extra
    columns are allowed and ignored.

    Every row rule is first evaluated as one aggregate in a single parallel `select`
    (`_all_rules_hold`); only when one fails are the per-row masks built, in the order
    above, to name the first broken rule and its rows. The verdict is the same either way.
    """
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise ContractError(
            f"{source}: missing column(s) {missing} for the {schema.name} schema "
            f"(expected columns {schema.names}; found {frame.columns})"
        )
    for col in schema.columns:
        actual = frame.schema[col.name]
        if actual != col.dtype:
            raise ContractError(
                f"{source}: column '{col.name}' has dtype {actual}, expected {col.dtype} "
                f"(the {schema.name} schema; nothing is cast silently)"
            )
    if _all_rules_hold(frame, schema):
        return frame
    _raise_first_broken_rule(frame, schema, source)
    return frame


def _all_rules_hold(frame: pl.DataFrame, schema: Schema) -> bool:
    """True when no row breaks a rule of `schema`: nulls, NaN, row checks, list lengths and
    the unique key, as one aggregate each in one `select` (no per-row mask is kept).

    False is only a "maybe": the unique key is tested on row hashes (all hashes distinct =>
    all keys distinct, but two keys may share a hash), so the exact check runs afterwards.
    """
    if any(not c.nullable and frame[c.name].null_count() for c in schema.columns):
        return False  # null counts are stored with the column: no pass over the data
    aggregates = []
    for col in schema.columns:
        dtype = frame.schema[col.name]
        if dtype.is_float():
            aggregates.append(pl.col(col.name).is_finite().fill_null(True).all())
        elif isinstance(dtype, pl.List) and dtype.inner.is_float():
            aggregates.append(pl.col(col.name).explode().is_finite().fill_null(True).all())
        aggregates.extend(check.expr.fill_null(True).all() for check in col.checks)
    if frame.height:
        aggregates.extend(pl.col(name).list.len().n_unique() == 1
                          for name in schema.equal_list_lengths)
    if len(schema.unique) == 1:
        aggregates.append(pl.col(schema.unique[0]).n_unique() == pl.len())
    elif schema.unique:
        # xor of per-column hashes under distinct seeds: equal keys give equal hashes, and it
        # costs ~half of hashing the key as a struct
        key = pl.col(schema.unique[0]).hash(1)
        for i, name in enumerate(schema.unique[1:], start=2):
            key = key ^ pl.col(name).hash(i)
        aggregates.append(key.n_unique() == pl.len())
    if not aggregates:
        return True
    verdicts = frame.select(a.alias(f"rule{i}") for i, a in enumerate(aggregates)).row(0)
    return all(verdicts)


def _raise_first_broken_rule(frame: pl.DataFrame, schema: Schema, source: str) -> None:
    """Raise the `ContractError` of the first broken rule (in `validate`'s order), built
    from per-row masks; returns quietly when nothing is broken (a row-hash collision)."""
    for col in schema.columns:
        series = frame[col.name]
        if not col.nullable:
            mask = series.is_null()
            if mask.any():
                raise _fail(source, col.name, int(mask.sum()), "no nulls",
                            _show_rows(frame, mask, [col.name]))
        nan_mask = _nan_mask(series)
        if nan_mask is not None and nan_mask.any():
            raise _fail(source, col.name, int(nan_mask.sum()), "finite numbers, no NaN",
                        _show_rows(frame, nan_mask, [col.name]))
        for check in col.checks:
            ok = frame.select(check.expr.fill_null(True)).to_series()
            if not ok.all():
                bad = ~ok
                raise _fail(source, col.name, int(bad.sum()), f"{col.name} {check.expected}",
                            _show_rows(frame, bad, [col.name]))
    for name in schema.equal_list_lengths:
        lengths = frame[name].list.len()
        if frame.height and lengths.n_unique() > 1:
            mode = lengths.mode().sort()[0]
            bad = lengths != mode
            raise _fail(source, name, int(bad.sum()), f"every list of length {mode}",
                        _show_rows(frame.with_columns(lengths.alias(f"len({name})")), bad,
                                   [f"len({name})"]))
    if schema.unique:
        dup = frame.select(pl.struct(list(schema.unique)).is_duplicated()).to_series()
        if dup.any():
            raise _fail(source, "+".join(schema.unique), int(dup.sum()),
                        f"unique ({', '.join(schema.unique)})",
                        _show_rows(frame, dup, list(schema.unique)))


def _nan_mask(series: pl.Series) -> pl.Series | None:
    """Rows holding a NaN (or inf) in a float column or inside a float list; None otherwise."""
    dtype = series.dtype
    if dtype.is_float():
        return ~series.is_finite().fill_null(True)
    if isinstance(dtype, pl.List) and dtype.inner.is_float():
        return series.list.eval(~pl.element().is_finite()).list.any().fill_null(False)
    return None


def validate_references(
    frame: pl.DataFrame, column: str, known: pl.Series, what: str, source: str = "<frame>"
) -> None:
    """Raise `ContractError` if `frame[column]` holds ids absent from `known` (e.g. unknown items)."""
    bad = ~frame[column].is_in(known.implode())
    if bad.any():
        raise _fail(source, column, int(bad.sum()), f"ids present in {what}",
                    _show_rows(frame, bad, [column]))


def read_parquet(path: str | os.PathLike, schema: Schema) -> pl.DataFrame:
    """Read a Parquet file and validate it; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ContractError(f"{path}: file not found (expected a {schema.name} Parquet file)")
    return validate(pl.read_parquet(path), schema, source=str(path))


def write_parquet(frame: pl.DataFrame, path: str | os.PathLike, schema: Schema) -> Path:
    """Validate `frame`, then write it atomically (temporary name, then rename).

    Only the schema's columns are written, in schema order, so the bytes depend on the
    data alone: the same frame gives the same file.
    """
    validate(frame, schema, source=str(path))
    return write_frame_atomic(frame.select(schema.names), path)

"""Data contracts: every kind of bad input gives the documented error and writes nothing."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from quasid.core.schemas import (
    EVENTS,
    INTERACTIONS,
    ITEMS,
    SID_TABLE,
    ContractError,
    read_parquet,
    validate,
    write_parquet,
)
from quasid.data.dataset import write_dataset


def _items(n: int = 4) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "content": pl.Series(np.ones((n, 3), dtype=np.float32)).cast(pl.List(pl.Float32)),
            "category": ["a", None, "b", "a"][:n],
            "price": np.linspace(1.0, 4.0, n),
            "is_cold": [False] * n,
        }
    )


def _interactions() -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [0, 0, 1], "item_id": [0, 1, 2], "ts": [1, 2, 1], "event": ["click"] * 3}
    )


def test_valid_frames_pass_unchanged():
    items = _items()
    assert validate(items, ITEMS).equals(items)
    assert validate(_interactions(), INTERACTIONS).height == 3


@pytest.mark.parametrize(
    "mutate, column, fragment",
    [
        (lambda f: f.drop("price"), "price", "missing column"),
        (lambda f: f.with_columns(pl.col("item_id").cast(pl.Int32)), "item_id", "dtype Int32, expected Int64"),
        (lambda f: f.with_columns(pl.col("price").cast(pl.Float32)), "price", "dtype Float32, expected Float64"),
        (lambda f: f.with_columns(price=pl.Series([1.0, math.nan, 2.0, 3.0])), "price", "NaN"),
        (lambda f: f.with_columns(price=pl.Series([1.0, -2.0, 2.0, 3.0])), "price", "price > 0"),
        (lambda f: f.with_columns(price=pl.Series([1.0, None, 2.0, 3.0])), "price", "no nulls"),
        (lambda f: f.with_columns(item_id=pl.Series([0, 1, 1, 3], dtype=pl.Int64)), "item_id",
         "unique (item_id)"),
    ],
)
def test_bad_items_name_column_and_rows(mutate, column, fragment, tmp_path):
    target = tmp_path / "items.parquet"
    with pytest.raises(ContractError) as err:
        write_parquet(mutate(_items()), target, ITEMS)
    message = str(err.value)
    assert str(target) in message
    assert column in message
    assert fragment in message
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


def test_error_shows_offending_row_numbers():
    bad = _items().with_columns(price=pl.Series([1.0, 2.0, -5.0, -6.0]))
    with pytest.raises(ContractError, match=r"2 rows .*row 2: price=-5.0; row 3: price=-6.0"):
        validate(bad, ITEMS, source="items.parquet")


def test_nan_inside_content_list_is_rejected():
    content = np.ones((4, 3), dtype=np.float32)
    content[3, 1] = np.nan
    bad = _items().with_columns(content=pl.Series(content).cast(pl.List(pl.Float32)))
    with pytest.raises(ContractError, match=r"'content'.*NaN.*row 3"):
        validate(bad, ITEMS)


def test_ragged_content_is_rejected():
    bad = _items().with_columns(
        content=pl.Series([[1.0, 2.0], [1.0, 2.0], [1.0], [1.0, 2.0]], dtype=pl.List(pl.Float32))
    )
    with pytest.raises(ContractError, match=r"every list of length 2.*row 2"):
        validate(bad, ITEMS)


def test_unknown_item_in_interactions_writes_nothing(tmp_path):
    out = tmp_path / "ds"
    inter = _interactions().with_columns(item_id=pl.Series([0, 1, 99], dtype=pl.Int64))
    with pytest.raises(ContractError, match=r"interactions.parquet: column 'item_id'.*item_id=99"):
        write_dataset(out, _items(), inter, {"name": "t"})
    assert not out.exists() or list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] in ([], ["ds"])


def test_failed_dataset_write_keeps_previous_files(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, _items(), _interactions(), {"name": "t"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ContractError):
        write_dataset(out, _items().drop("is_cold"), _interactions(), {"name": "t2"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_events_schema_rules():
    events = pl.DataFrame(
        {
            "experiment_id": ["e"], "arm": ["a"], "user_id": [1], "request_id": [1], "ts": [0],
            "day": pl.Series([0], dtype=pl.Int32), "item_id": [3],
            "position": pl.Series([0], dtype=pl.Int16), "event_type": ["purchase"],
            "quantity": pl.Series([1], dtype=pl.Int32), "value": [2.0],
            "is_cold_item": [False], "is_cold_user": [True],
        }
    )
    with pytest.raises(ContractError, match="one of impression, click, order, cancel"):
        validate(events, EVENTS)
    validate(events.with_columns(event_type=pl.lit("order")), EVENTS)


def test_sid_table_and_round_trip(tmp_path):
    sids = pl.DataFrame(
        {
            "item_id": [1, 2],
            "sid": pl.Series([[1, 2, 3], [1, 2, 3]], dtype=pl.List(pl.Int16)),
            "tokenizer": ["rqvae", "rqvae"],
            "collision_rank": pl.Series([0, 1], dtype=pl.Int16),
        }
    )
    path = write_parquet(sids, tmp_path / "sids.parquet", SID_TABLE)
    assert read_parquet(path, SID_TABLE).equals(sids)
    with pytest.raises(ContractError, match="file not found"):
        read_parquet(tmp_path / "missing.parquet", SID_TABLE)

"""Leave-one-out, time cutoff and request histories against hand-built examples."""

from __future__ import annotations

import polars as pl

from quasid.core.recommender import PAD
from quasid.data.sequences import sequence_windows
from quasid.data.splits import cold_users, leave_one_out, time_split


def _log() -> pl.DataFrame:
    # user 1: items 10, 11, 12, 13 at ts 4, 1, 3, 2 -> time order 11, 13, 12, 10
    return pl.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2, 3],
            "item_id": [10, 11, 12, 13, 20, 21, 30],
            "ts": [4, 1, 3, 2, 5, 6, 9],
            "event": ["click"] * 7,
        }
    )


def test_leave_one_out_takes_the_last_two_in_time_order():
    split = leave_one_out(_log())
    assert split.test.sort("user_id")["item_id"].to_list() == [10, 21, 30]
    assert split.valid.sort("user_id")["item_id"].to_list() == [12, 20]
    assert split.train["item_id"].to_list() == [11, 13]
    assert split.train.height + split.valid.height + split.test.height == 7


def test_leave_one_out_drops_cold_items_from_train_only():
    split = leave_one_out(_log(), cold_items=pl.Series([13, 10]))
    assert split.train["item_id"].to_list() == [11]
    assert 10 in split.test["item_id"].to_list()


def test_time_split_is_strict_at_the_cutoff():
    train, window = time_split(_log(), cutoff_ts=4)
    assert sorted(train["ts"].to_list()) == [1, 2, 3]
    assert sorted(window["ts"].to_list()) == [4, 5, 6, 9]


def test_sequence_windows_list_previous_items_oldest_first():
    hist, items, users, is_last = sequence_windows(_log(), max_len=2)
    mine = users == 1
    assert items[mine].tolist() == [11, 13, 12, 10]
    assert hist[mine].tolist() == [[PAD, PAD], [PAD, 11], [11, 13], [13, 12]]
    assert is_last.tolist() == [False, False, False, True, False, True, True]


def test_cold_users_counts_training_history():
    train = _log().filter(pl.col("user_id") != 3)
    assert cold_users(train, _log()["user_id"], max_history=2).to_list() == [2, 3]

"""Traffic splitting: stable buckets, allocations, layers, holdout, rebuild from the salt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from scipy.stats import chi2_contingency, chisquare

from simulator.splitter import (
    N_BUCKETS,
    NOT_ASSIGNED,
    Allocation,
    assign_arms,
    assignment_table,
    bucket_of,
)

UNITS = np.arange(200_000, dtype=np.int64)


def test_buckets_are_pinned_values():
    # Pinned once: a change of hash function would silently reshuffle every experiment.
    assert bucket_of(np.arange(8), "golden-salt").tolist() == [
        7218, 3576, 6893, 2184, 1687, 9140, 8636, 3181]
    assert bucket_of(np.array([-5, 2**62]), "x").tolist() == [3599, 7136]


def test_buckets_are_the_same_in_another_process():
    code = ("import json, numpy as np; from simulator.splitter import bucket_of; "
            "print(json.dumps(bucket_of(np.arange(5000), 'salt-a').tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, cwd=os.getcwd())
    assert json.loads(out.stdout) == bucket_of(np.arange(5000), "salt-a").tolist()


def test_buckets_are_uniform_and_salt_dependent():
    b = bucket_of(UNITS, "uniform")
    assert b.min() >= 0 and b.max() < N_BUCKETS and b.dtype == np.int32
    counts = np.bincount(b // 100, minlength=100)  # 100 groups of 100 buckets
    assert chisquare(counts).pvalue > 1e-3
    assert (bucket_of(UNITS[:1000], "other") != b[:1000]).mean() > 0.99


@pytest.mark.parametrize("shares", [(0.05, 0.05), (0.5, 0.5), (0.1, 0.2, 0.3)])
def test_allocations_within_binomial_noise(shares):
    alloc = Allocation(tuple((f"arm{j}", s) for j, s in enumerate(shares)), salt="alloc")
    arm, _ = assign_arms(UNITS, alloc)
    n = len(UNITS)
    for j, share in enumerate(shares):
        count = int((arm == j).sum())
        sd = np.sqrt(n * share * (1 - share))
        assert abs(count - n * share) < 4 * sd, (j, count, n * share)
    rest = 1 - sum(shares)
    assert abs(int((arm == NOT_ASSIGNED).sum()) - n * rest) < 4 * np.sqrt(n * max(rest, 1e-9)) + 1


def test_layers_are_independent_and_a_shared_salt_is_not():
    a = Allocation((("c", 0.5), ("t", 0.5)), salt="layer-retrieval")
    b = Allocation((("x", 0.2), ("y", 0.3), ("z", 0.5)), salt="layer-ranking")
    arm_a, _ = assign_arms(UNITS, a)
    arm_b, _ = assign_arms(UNITS, b)
    table = np.zeros((2, 3))
    np.add.at(table, (arm_a, arm_b), 1)
    assert chi2_contingency(table).pvalue > 1e-3
    # The same test sees the dependence two experiments of one layer would have.
    same = Allocation((("x", 0.2), ("y", 0.3), ("z", 0.5)), salt="layer-retrieval")
    arm_s, _ = assign_arms(UNITS, same)
    table[:] = 0
    np.add.at(table, (arm_a, arm_s), 1)
    assert chi2_contingency(table).pvalue < 1e-10


def test_experiments_in_one_layer_are_mutually_exclusive():
    first = Allocation((("c", 0.05), ("t", 0.05)), salt="layer", offset=0)
    second = Allocation((("c", 0.05), ("t", 0.05)), salt="layer", offset=1000)
    arm1, _ = assign_arms(UNITS, first)
    arm2, _ = assign_arms(UNITS, second)
    assert not ((arm1 >= 0) & (arm2 >= 0)).any()
    assert (arm1 >= 0).sum() > 0 and (arm2 >= 0).sum() > 0


def test_holdout_is_kept_out_and_balanced():
    alloc = Allocation((("c", 0.5), ("t", 0.5)), salt="h", holdout=0.1)
    arm, _ = assign_arms(UNITS, alloc)
    held = bucket_of(UNITS, alloc.holdout_salt) < 1000
    assert (arm[held] == NOT_ASSIGNED).all()
    assert abs(held.mean() - 0.1) < 0.005
    assert abs((arm == 0).sum() / (arm >= 0).sum() - 0.5) < 0.01


def test_assignment_table_is_a_function_of_the_salt():
    units = pl.DataFrame({"unit_id": UNITS[:5000], "assigned_at": np.zeros(5000, dtype=np.int64)})
    alloc = Allocation((("c", 0.3), ("t", 0.3)), salt="rebuild")
    one = assignment_table("e", units, alloc)
    two = assignment_table("e", units.sample(fraction=1.0, shuffle=True, seed=1), alloc)
    assert one.equals(two)
    expected = np.where(bucket_of(one["unit_id"].to_numpy(), "rebuild") < 3000, "c", "t")
    assert (one["arm"].to_numpy() == expected).all()
    assert one["bucket"].to_list() == bucket_of(one["unit_id"].to_numpy(), "rebuild").tolist()


@pytest.mark.parametrize("arms, error", [
    ((("c", 0.00005), ("t", 0.5)), "multiple of 1/10000"),
    ((("c", 0.6), ("t", 0.6)), "do not fit"),
    ((("c", 0.5), ("c", 0.5)), "distinct"),
])
def test_bad_allocations_are_rejected(arms, error):
    with pytest.raises(ValueError, match=error):
        Allocation(arms, salt="s")

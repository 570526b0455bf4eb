"""Fixtures of the simulator tests: a base experiment config on the small synthetic world."""

from __future__ import annotations

import pytest


@pytest.fixture()
def base_config(small_world_dir) -> dict:
    """Popularity vs random, 50/50, 10 days + 5 pre-period days, two cohorts."""
    return {
        "experiment_id": "exp",
        "seed": 3,
        "data": {"path": str(small_world_dir)},
        "arms": [
            {"name": "control", "stack": "popularity", "allocation": 0.5},
            {"name": "treatment", "stack": "random", "allocation": 0.5},
        ],
        "days": 10,
        "pre_days": 5,
        "slate_size": 10,
        "batch_size": 500,
        "cohorts": [
            {"name": "premium", "level": "item", "expr": "price > 30"},
            {"name": "heavy", "level": "user", "expr": "n_history >= 8"},
        ],
    }

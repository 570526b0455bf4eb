"""Fake runs shared by the analysis tests (small, session-scoped, written by DuckDB SQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.fake_events import FakeRunConfig, write_fake_run


@pytest.fixture(scope="session")
def run_no_pre(tmp_path_factory) -> Path:
    """An A/A run without pre-period (so every mean row is a plain Welch test)."""
    cfg = FakeRunConfig(n_users=1_500, days=4, pre_days=0, seed=11)
    return write_fake_run(tmp_path_factory.mktemp("runs") / "no_pre", cfg)


@pytest.fixture(scope="session")
def run_effect(tmp_path_factory) -> Path:
    """A run with a pre-period and a +30% order effect in `treatment`."""
    cfg = FakeRunConfig(n_users=3_000, days=5, pre_days=5, seed=5, requests_per_user_day=2.0,
                        effects={"treatment": 0.3})
    return write_fake_run(tmp_path_factory.mktemp("runs") / "effect", cfg)

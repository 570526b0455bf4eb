"""Shared fixtures: a small synthetic world (session-scoped) and the Amazon data location."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings at import: give it a private home and no telemetry before any
# test imports it (a local server per process otherwise logs offline-telemetry errors).
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="quasid-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_PREFECT_HOME))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

AMAZON_DIR = Path(os.environ.get(
    "QUASID_AMAZON_DIR",
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon"))
"""The S3-Rec files (`Beauty.txt`, ...): `QUASID_AMAZON_DIR`, else this machine's shared copy."""

SMALL_WORLD = dict(n_items=600, n_users=1_500, content_dim=16, taste_dim=8, mean_interactions=8.0,
                   seed=7)


@pytest.fixture(scope="session")
def small_world_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (items, interactions, world, data card)."""
    from quasid.data.synthetic import WorldConfig, synthesize

    out = tmp_path_factory.mktemp("small_world")
    synthesize(WorldConfig(**SMALL_WORLD), out)
    return out


@pytest.fixture(scope="session")
def small_world(small_world_dir):
    """The small synthetic dataset, loaded and validated."""
    from quasid.data.dataset import load_dataset

    return load_dataset(small_world_dir)


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """The Amazon S3-Rec files; the test is skipped when they are absent."""
    if not (AMAZON_DIR / "Beauty.txt").exists():
        pytest.skip(f"Amazon data not found at {AMAZON_DIR}")
    return AMAZON_DIR

"""Fixtures shared by the quasid tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 120-item synthetic dataset folder for the offline benchmark's tests (one per module)."""
    from quasid.data.synthetic import WorldConfig, synthesize

    out = tmp_path_factory.mktemp("tiny_world")
    synthesize(WorldConfig(n_items=120, n_users=250, content_dim=8, taste_dim=4,
                           mean_interactions=6.0, seed=3), out)
    return out

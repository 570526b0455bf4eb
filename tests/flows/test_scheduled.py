"""Nightly runs that retrain: `scheduled_run` on two injected nights writes two dated run
folders with date-derived seeds, each with its own trained tokenizers, stacks and report;
`analyze_latest` (the daily deployment) reads the newest."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY_WORLD = dict(n_items=200, n_users=800, content_dim=16, taste_dim=8, mean_interactions=8.0)
TOKENIZER = {"hidden": [32], "latent": 8, "codebook_size": 16}
STACK = {"retriever": {"epochs": 1, "d_model": 32, "n_layers": 1, "d_ff": 64},
         "ranker": {"epochs": 1, "d_model": 16}}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_two_nights_train_two_runs_and_the_daily_analysis_reads_the_newest(harness, tmp_path):
    from flows.deployments import deployments
    from flows.pipeline import analyze_latest, latest_run, nightly_seed, night_of, scheduled_run

    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "pipeline": {"synthetic": TINY_WORLD, "tokenizer_epochs": 1,
                     "tokenizer_overrides": {"rqvae": TOKENIZER, "quasid": TOKENIZER},
                     "stack_overrides": STACK, "n_shards": 1,
                     "metrics": ["gmv_per_user", "ctr"]},
        "experiment_id": "nightly", "data": {"path": "synthetic"},
        "arms": [{"name": "control", "tokenizer": "rqvae", "allocation": 0.5},
                 {"name": "treatment", "tokenizer": "quasid", "allocation": 0.5}],
        "days": 4, "pre_days": 2, "slate_size": 10}))
    root = tmp_path / "nightly"
    nights = ["2026-12-01", "2026-12-02"]
    for night in nights:
        scheduled_run(str(config), str(root), date=night)
    assert sorted(p.name for p in root.iterdir()) == nights
    seeds = []
    for night in nights:
        folder = root / night
        manifest = json.loads((folder / "run" / "manifest.json").read_text())
        assert manifest["seed"] == nightly_seed(night_of(night)) == int(night.replace("-", ""))
        seeds.append(manifest["seed"])
        for tok in ("rqvae", "quasid"):  # trained in each night's folder, with its seed
            trained = f"{tok}/seed{manifest['seed']}"
            done = json.loads((folder / "tokenizers" / trained / "done.json").read_text())
            assert done["seed"] == manifest["seed"]
            assert (folder / "tokenizers" / trained / "sids.parquet").exists()
            assert (folder / "stacks" / trained / "stack.pt").exists()
        assert (folder / "report.md").exists()
    assert seeds[0] != seeds[1]
    assert (root / nights[0] / "data" / "items.parquet").read_bytes() != (
        root / nights[1] / "data" / "items.parquet").read_bytes()  # that night's world

    assert latest_run(root) == root / nights[1]
    before = (root / nights[0] / "results.json").stat().st_mtime_ns
    summary = analyze_latest(str(root))
    assert summary["folder"] == str(root / nights[1])
    assert (root / nights[0] / "results.json").stat().st_mtime_ns == before

    nightly, daily = deployments(root, config, "0 2 * * *", "0 7 * * *")
    assert "seed" not in nightly.parameters and daily.parameters["root"] == str(root)

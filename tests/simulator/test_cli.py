"""`quasid simulate`: a YAML config in, a run directory and a summary table out."""

from __future__ import annotations

import json

import typer
import yaml
from typer.testing import CliRunner

from simulator.cli import register
from simulator.config import load_config


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing to a single one
        """Nothing."""

    return app


def test_simulate_writes_a_run_and_prints_the_summary(base_config, tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(base_config))
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), ["simulate", "--config", str(config), "--out", str(out),
                                         "--shards", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for arm, row in manifest["counts"]["experiment"].items():
        assert arm in result.output
        assert f"{row['impressions']:,}" in result.output
    assert manifest["arms"] == {"control": 0.5, "treatment": 0.5}
    assert manifest["control"] == "control" and manifest["seed"] == 3
    assert manifest["config"]["experiment_id"] == "exp"
    assert len(manifest["data_fingerprint"]) == 64
    assert (out / "assignments.parquet").exists()


def test_simulate_reports_a_bad_config_by_file_and_field(base_config, tmp_path):
    bad = dict(base_config, slate_size=0)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(_app(), ["simulate", "--config", str(config), "--out",
                                         str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "slate_size" in result.output
    assert not (tmp_path / "run").exists()


def test_shipped_example_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("sim_*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        assert cfg.control_arm in {a.name for a in cfg.arms}

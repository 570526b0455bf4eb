"""`quasid data synth` and `quasid data describe` through the console app."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_synth_then_describe(tmp_path):
    out = tmp_path / "w"
    res = runner.invoke(app, ["data", "synth", "--out", str(out), "--seed", "3", "--items", "300",
                              "--users", "400", "--dim", "8"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"items.parquet", "interactions.parquet",
                                              "world.npz", "datacard.json"}
    card = json.loads((out / "datacard.json").read_text())
    assert card["seed"] == 3 and card["counts"]["items"] == 300 and card["real"] == []
    res = runner.invoke(app, ["data", "describe", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["counts"]["items"] == 300
    assert summary["cohorts"]["new_items"] == 30
    assert summary["counts"]["interactions"] == card["counts"]["interactions"]


def test_synth_lookalike_leaf_option(tmp_path):
    cards = {}
    for flag in ("--lookalike-other-leaf", "--lookalike-same-leaf", None):
        out = tmp_path / str(flag)
        args = ["data", "synth", "--out", str(out), "--items", "300", "--users", "400",
                "--dim", "8"] + ([flag] if flag else [])
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        cards[flag] = json.loads((out / "datacard.json").read_text())["config"]
    assert cards[None]["lookalike_other_leaf"] is True  # the default: another leaf
    assert cards["--lookalike-other-leaf"]["lookalike_other_leaf"] is True
    assert cards["--lookalike-same-leaf"]["lookalike_other_leaf"] is False


def test_describe_names_a_missing_folder(tmp_path):
    res = runner.invoke(app, ["data", "describe", str(tmp_path / "nope")])
    assert res.exit_code != 0
    assert "not a dataset folder" in str(res.exception)

"""Offline evaluation: HR and NDCG against hand-computed values, the leave-one-out requests,
aggregation over seeds, and the `quasid eval` command end to end on a tiny world."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from quasid.core.recommender import PAD
from quasid.core.schemas import SID_TABLE, write_parquet
from quasid.data.dataset import load_dataset
from quasid.data.sequences import drop_last, loo_requests
from quasid.evaluation.offline import aggregate, offline_eval
from quasid.stack.metrics import hit_ndcg
from tests.quasid.sid_testing import kmeans_sid_table, one_thread  # noqa: F401 (fixture)

TINY = {"retriever": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "epochs": 1,
                      "batch_size": 256, "max_history": 6},
        "ranker": {"d_model": 16, "n_heads": 2, "n_layers": 1, "epochs": 1, "batch_size": 256,
                   "negatives": 4, "max_history": 6},
        "candidates": 20, "weight_grid": [1.0]}


def test_hit_and_ndcg_against_hand_computed_values():
    targets = np.array([7, 7, 7, 7, 7])
    ranked = np.full((5, 10), 0)
    ranked[0, 0] = 7  # rank 0
    ranked[1, 3] = 7  # rank 3
    ranked[2, 4] = 7  # rank 4: the last place counted by @5
    ranked[3, 9] = 7  # rank 9: only @10
    m = hit_ndcg(ranked, targets)  # row 4: a miss
    assert m["hr@5"].tolist() == [1, 1, 1, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 1, 1, 0]
    assert np.allclose(m["ndcg@5"], [1, 1 / math.log2(5), 1 / math.log2(6), 0, 0])
    assert np.allclose(m["ndcg@10"], [1, 1 / math.log2(5), 1 / math.log2(6), 1 / math.log2(11), 0])
    assert math.isclose(m["ndcg@10"].mean(), (1 + 1 / math.log2(5) + 1 / math.log2(6)
                                              + 1 / math.log2(11)) / 5)
    with pytest.raises(ValueError, match="expected"):
        hit_ndcg(ranked[:, :5], targets)


def test_leave_one_out_requests_and_validation_view():
    log = pl.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 3], "item_id": [10, 11, 12, 13, 20, 21, 30],
                        "ts": [4, 1, 3, 2, 5, 6, 9], "event": ["x"] * 7})
    hist, targets = loo_requests(log, max_len=2)
    # user 1 in time order: 11, 13, 12, 10; user 3 has a single item: no request
    assert targets.tolist() == [10, 21]
    assert hist.tolist() == [[13, 12], [PAD, 20]]
    v_hist, v_targets = loo_requests(drop_last(log), max_len=3)
    assert v_targets.tolist() == [12] and v_hist.tolist() == [[PAD, 11, 13]]


def _run(tok, seed, value):
    seg = {m: value for m in ("hr@5", "hr@10", "ndcg@5", "ndcg@10")}
    return {"settings": {"tokenizer": tok, "seed": seed}, "n": {"all": 100, "cold": 10},
            "stack": {"all": seg, "cold": {m: value / 2 for m in seg}},
            "retrieval": {"all": seg, "cold": seg}}


def test_aggregate_means_and_sample_std_over_seeds():
    rows = aggregate([_run("a", 0, 0.1), _run("a", 1, 0.2), _run("a", 2, 0.6), _run("b", 0, 0.3)])
    a_all, a_cold, b_all, _ = rows
    assert (a_all["tokenizer"], a_all["segment"], a_cold["segment"]) == ("a", "all", "cold")
    assert math.isclose(a_all["hr@10"], 0.3) and math.isclose(a_cold["ndcg@5"], 0.15)
    assert math.isclose(a_all["hr@10_std"], np.std([0.1, 0.2, 0.6], ddof=1))
    assert b_all["hr@10_std"] == 0.0 and b_all["seeds"] == 1 and a_all["requests"] == 100


def test_welch_tests_of_quasid_against_each_baseline_match_a_hand_computation():
    from quasid.evaluation.offline import welch_tests

    q, r = [0.10, 0.12, 0.11], [0.08, 0.09, 0.07, 0.085]
    runs = ([_run("quasid", i, v) for i, v in enumerate(q)] + [_run("rqvae", i, v) for i, v in enumerate(r)]
            + [_run("one", 0, 0.1)])
    rows = welch_tests(runs)
    row = next(w for w in rows if (w["stage"], w["segment"], w["metric"], w["baseline"])
               == ("stack", "all", "hr@10", "rqvae"))
    # Welch by hand: t = (m1 - m2) / sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite df
    v1, v2 = np.var(q, ddof=1) / 3, np.var(r, ddof=1) / 4
    t = (np.mean(q) - np.mean(r)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 3)
    from scipy import stats

    assert math.isclose(row["p"], 2 * stats.t.sf(abs(t), df), rel_tol=1e-9)
    assert math.isclose(row["relative"], np.mean(q) / np.mean(r) - 1) and row["seeds"] == [3, 4]
    one = [w for w in rows if w["baseline"] == "one"]
    assert one and all(math.isnan(w["p"]) for w in one)  # one seed: no test
    assert len(rows) == 2 * 2 * 2 * 2  # stages x segments x metrics x baselines
    assert welch_tests([_run("rqvae", 0, 0.1)]) == []


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from quasid.data.synthetic import WorldConfig, synthesize

    out = tmp_path_factory.mktemp("tiny_world")
    synthesize(WorldConfig(n_items=120, n_users=250, content_dim=8, taste_dim=4,
                           mean_interactions=6.0, seed=3), out)
    return out


def test_offline_eval_writes_results_and_the_cli_reads_them_back(tiny_world, tmp_path):
    ds = load_dataset(tiny_world)
    sids = kmeans_sid_table(ds.content(), ds.items["item_id"].to_numpy(), 2, 4)
    for seed in range(2):  # SID tables in place: no tokenizer training in this test
        write_parquet(sids, tmp_path / "out" / "runs" / "km" / f"seed{seed}" / "tokenizer"
                      / "sids.parquet", SID_TABLE)
    res = offline_eval(tiny_world, ["km"], 2, tmp_path / "out", overrides=TINY, progress=False)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rows == res["rows"]
    assert [(r["tokenizer"], r["segment"]) for r in rows] == [("km", "all"), ("km", "cold")]
    keys = {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}
    assert keys | {f"{k}_std" for k in keys} <= set(rows[0])
    for r in rows:
        assert 0 <= r["ndcg@10"] <= r["hr@10"] <= 1 and r["hr@5"] <= r["hr@10"]
    runs = [json.loads((tmp_path / "out" / "runs" / "km" / f"seed{s}" / "metrics.json").read_text())
            for s in range(2)]
    assert math.isclose(rows[0]["hr@10"], np.mean([r["stack"]["all"]["hr@10"] for r in runs]))
    assert "| km | all |" in (tmp_path / "out" / "results.md").read_text()

    from flows.cli import (
        app,  # aggregation of the finished runs only: fast, no training
    )

    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_world), "--tokenizers", "km",
                                      "--seeds", "2", "--out", str(tmp_path / "out"), "--reuse-only",
                                      "--overrides", json.dumps(TINY)])
    assert result.exit_code == 0, result.output
    assert "results.json" in result.output
    # a seed never run is reported as failed, not silently dropped
    res3 = offline_eval(tiny_world, ["km"], 3, tmp_path / "out", overrides=TINY, reuse_only=True,
                        progress=False)
    assert list(res3["failed"]) == ["km/seed2"] and res3["rows"][0]["seeds"] == 2


def test_a_run_retrains_its_tokenizer_when_the_tokenizer_settings_change(tiny_world, tmp_path):
    """Changed tokenizer epochs: the run's SID table is trained again, not silently reused."""
    from quasid.evaluation.offline import eval_run

    tok = {"hidden": [16], "latent": 8, "codebook_size": 8, "kmeans_iters": 3,
           "train": {"batch_size": 64}}
    run = tmp_path / "run"
    eval_run(tiny_world, "rqvae", 0, run, overrides=TINY, tokenizer_epochs=1,
             tokenizer_overrides=tok, save_stack=False)
    first = json.loads((run / "tokenizer" / "metrics.json").read_text())
    eval_run(tiny_world, "rqvae", 0, run, overrides=TINY, tokenizer_epochs=2,
             tokenizer_overrides=tok, save_stack=False)
    second = json.loads((run / "tokenizer" / "metrics.json").read_text())
    assert (first["epochs"], second["epochs"]) == (1, 2)
    settings = json.loads((run / "tokenizer" / "eval_settings.json").read_text())
    assert settings["tokenizer_epochs"] == 2
    assert json.loads((run / "metrics.json").read_text())["settings"]["tokenizer_epochs"] == 2

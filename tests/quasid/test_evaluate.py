"""Offline evaluation: HR and NDCG against hand-computed values, the leave-one-out requests,
aggregation over seeds, and the `quasid eval` command end to end on a tiny world."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


TUNING = Path(__file__).resolve().parents[2] / "benchmarks" / "tuning.py"


def test_tuning_draws_the_same_points_inside_each_tokenizers_space():
    import runpy

    tuning = runpy.run_path(str(TUNING))  # the module's functions, main() not run
    spaces, draw = tuning["SPACES"], tuning["random_points"]
    for model, space in spaces.items():
        points = draw(model, 6, seed=1)
        assert points[0] == {} and len(points) == 6  # the defaults come first
        assert points == draw(model, 6, seed=1)  # seeded: the same points on a rerun
        assert points != draw(model, 6, seed=2)
        for point in points[1:]:
            flat = {k: v for k, v in point.items() if k != "train"}
            flat |= {f"train.{k}": v for k, v in point.get("train", {}).items()}
            assert set(flat) == set(space)  # every dimension drawn, nothing else
            for key, value in flat.items():
                dim = space[key]
                if isinstance(dim, list):
                    assert value in dim
                else:
                    assert dim[1] * 0.999 <= value <= dim[2] * 1.001, (model, key, value)
    # QuaSID searches its own terms on top of RQ-VAE's; the baselines get as many points
    assert set(spaces["rqvae"]) < set(spaces["quasid"])
    assert {"hamr_weight", "contrastive_weight", "tau_dup", "train.neighbours",
            "train.mine_conflicts"} <= set(spaces["quasid"])
    # in another tokenizer's space: exactly that tokenizer's points (a paired search)
    assert draw("quasid", 6, seed=1, space="rqvae") == draw("rqvae", 6, seed=1)
    with pytest.raises(SystemExit, match="--space 'quasid'"):
        draw("rqvae", 3, seed=0, space="quasid")  # rqvae has no HaMR fields
    with pytest.raises(SystemExit, match="--model 'nope'"):
        draw("nope", 3, seed=0)


def test_tokenizer_tuning_scores_every_point_on_the_validation_split(tiny_world, tmp_path,
                                                                      monkeypatch, capsys):
    import runpy

    fixed = {"hidden": [16], "latent": 8, "codebook_size": 8, "kmeans_iters": 3,
             "train": {"batch_size": 64}}
    out = tmp_path / "tune"
    monkeypatch.setattr("sys.argv", [str(TUNING), "--model", "rqvae", "--data", str(tiny_world),
                                     "--out", str(out), "--points", "3", "--tokenizer-epochs", "1",
                                     "--overrides", json.dumps(TINY), "--base", json.dumps(fixed)])
    runpy.run_path(str(TUNING), run_name="__main__")
    printed = capsys.readouterr().out
    tuning = json.loads((out / "tuning.json").read_text())
    points = tuning["points"]
    assert [p["name"] for p in points] == ["p00", "p01", "p02"] and not tuning["failed"]
    assert points[0]["overrides"] == fixed  # the defaults, with the fixed fields
    for p in points[1:]:  # drawn, but --base's fields held fixed
        o = p["overrides"]
        assert o["codebook_size"] == 8 and o["train"]["batch_size"] == 64
        assert 0.1 <= o["beta"] <= 0.5 and 1e-3 <= o["train"]["lr"] <= 4e-3
    assert points[1]["overrides"] != points[2]["overrides"]
    for p in points:  # each figure is its run's validation-split metrics, never the test's
        run = json.loads((out / "runs" / p["name"] / "metrics.json").read_text())
        assert run["settings"]["split"] == "valid" and run["settings"]["tokenizer_epochs"] == 1
        assert run["settings"]["tokenizer_overrides"] == p["overrides"]
        assert p["hr@10"] == run["stack"]["all"]["hr@10"]
        assert p["beam_ndcg@10"] == run["retrieval"]["all"]["ndcg@10"]
    assert tuning["best"] == max(points, key=lambda p: (p["hr@10"], p["ndcg@10"]))
    assert json.loads((out / "best_overrides.json").read_text()) == tuning["best"]["overrides"]
    md = (out / "tuning.md").read_text()
    assert "**best**" in md and "- p01: `" in md and "best overrides" in printed


def test_run_parallel_reports_finished_calls_and_stops_the_rest_at_the_deadline():
    """Calls run in spawned processes: a quick one is reported with its result, a failing
    one with its error, and one still running at the deadline is stopped and returned."""
    import time

    from quasid.evaluation.offline import run_parallel

    got = {}

    def report(key, get):
        try:
            got[key] = ("ok", get())
        except Exception as exc:  # noqa: BLE001 - the error is what the test looks at
            got[key] = ("error", type(exc).__name__)

    started = time.perf_counter()
    calls = {"quick": ((0.0,), {}), "bad": ((-1.0,), {}), "slow": ((120.0,), {})}
    stopped = run_parallel(time.sleep, calls, 3, "cpu", deadline=10, report=report)
    assert got == {"quick": ("ok", None), "bad": ("error", "ValueError")}
    assert stopped == ["slow"]
    assert time.perf_counter() - started < 60  # the 120 s call did not run to its end


SPLIT_GAP = Path(__file__).resolve().parents[2] / "benchmarks" / "split_gap.py"


def test_split_gap_protocols_and_their_scores():
    import runpy

    from quasid.stack.transitions import TransitionRecommender

    gap = runpy.run_path(str(SPLIT_GAP))
    # users' sequences in time order; item 9 is cold
    seqs = {1: [1, 2, 3, 4], 2: [1, 2, 5, 3], 3: [2, 3, 9, 4], 4: [5, 1, 2, 6],
            5: list(range(10, 24))}  # user 5 gives the baselines a catalogue past 10 items
    interactions = pl.DataFrame(
        [{"user_id": u, "item_id": i, "ts": t} for u, s in seqs.items() for t, i in enumerate(s)])
    cold = pl.Series([9])
    protocol, (after, fit_drop) = gap["protocol"], gap["PROTOCOLS"]["validation"]
    first4 = pl.col("user_id") <= 4
    # validation: target the second-to-last; fit on all but the last two, cold dropped
    train, hist, targets = protocol(interactions, cold, after, fit_drop)
    assert sorted(train.filter(first4)["item_id"].to_list()) == [1, 1, 1, 2, 2, 2, 3, 5]
    assert train.filter(~first4).height == 12
    assert targets.tolist() == [3, 5, 9, 2, 22] and hist[:, -1].tolist() == [2, 2, 3, 1, 21]
    # the models' test protocol: the same training part, the validation item in the history
    train2, hist, targets = protocol(interactions, cold, *gap["PROTOCOLS"]["test, fit as the models"])
    assert train2.equals(train)
    assert targets.tolist() == [4, 3, 4, 6, 23] and hist[:, -1].tolist() == [3, 5, 9, 2, 22]
    # fit on all but the last: the validation items (but the cold 9) are training data
    train3, _, _ = protocol(interactions, cold, *gap["PROTOCOLS"]["test, fit on all but the last"])
    assert train3.height == train.height + 4
    catalog = np.unique(interactions["item_id"].to_numpy())
    out = gap["scores"](train, hist, targets, catalog)
    direct = hit_ndcg(TransitionRecommender.fit(train).recommend(hist, 10)[0], targets)
    assert out["transition_hr@10"] == pytest.approx(direct["hr@10"].mean())
    assert out["transition_ndcg@10"] == pytest.approx(direct["ndcg@10"].mean())
    # only user 2 hits: its history 1, 2, 5 backs off from 5 (-> 1, seen) to 2 -> 3
    assert direct["hr@10"].tolist() == [0, 1, 0, 0, 0]
    assert out["target_median_count"] == 0.0  # targets 4, 3, 4, 6, 23: 0, 1, 0, 0, 0 times
    assert out["target_share_below_5"] == 1.0 and out["target_in_history"] == 0.0
    # popularity ranks the catalogue: 1 and 2 (3 each), the once-seen items by id (3, 5,
    # 10 .. 21), then the unseen ones by id (4, 6, 9, 22, 23), history left out: user 2
    # (seen 1, 2, 5) gets 3 first; user 5 (seen 10 .. 22) gets 1, 2, 3, 5, 4, 6, 9, 23
    assert out["popularity_hr@10"] == pytest.approx(2 / 5)

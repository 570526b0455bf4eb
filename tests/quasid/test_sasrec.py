"""SASRec: its sequences, causality, the losses against hand computations, serving against
brute force, that it learns, seeding, early stopping, cold items, and its offline-benchmark run."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from quasid.core.config import ConfigError
from quasid.core.recommender import PAD, Recommender
from quasid.core.schemas import ContractError
from quasid.data.sequences import drop_last, loo_requests, row_mapper
from quasid.stack.config import TransitionConfig
from quasid.stack.metrics import hit_ndcg
from quasid.stack.sasrec import (
    NAME,
    TRANSITIONS_NAME,
    Sasrec,
    SasrecConfig,
    SasrecRecommender,
    fit_sasrec,
    hit_rate,
    sasrec_config,
    train_sasrec,
    training_sequences,
)
from quasid.stack.transitions import FollowerTable
from tests.quasid.sid_testing import one_thread  # noqa: F401 (autouse fixture)

SMALL = SasrecConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0, max_history=6,
                     epochs=12, batch_size=64, lr=1e-2, warmup=5, patience=None)
N_RULE = 30


def _rule_log(n_users: int = 240, length: int = 7, seed: int = 0
              ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Users who follow `next = perm[current]` from a random start: (log, item ids, perm).

    Item ids are 100 + 3 * row (not rows: the id <-> row mapping is exercised); two more ids
    of the catalog never occur (cold items).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N_RULE)
    rows = np.empty((n_users, length), dtype=np.int64)
    rows[:, 0] = rng.integers(0, N_RULE, n_users)
    for t in range(1, length):
        rows[:, t] = perm[rows[:, t - 1]]
    ids = 100 + 3 * np.arange(N_RULE + 2)
    log = pl.DataFrame({"user_id": np.repeat(np.arange(n_users), length),
                        "item_id": ids[rows.ravel()],
                        "ts": np.tile(np.arange(length), n_users), "event": "view"})
    return log, ids, perm


def _items(ids: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids})


def _probe(ids: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One request per rule item: history = its two predecessors and itself, target = its
    successor."""
    inv = np.argsort(perm)
    cur = np.arange(N_RULE)
    hist = np.stack([inv[inv[cur]], inv[cur], cur], axis=1)
    return ids[hist], ids[perm[cur]]


def test_training_sequences_are_the_last_items_shifted_by_one():
    log = pl.DataFrame({"user_id": [1, 1, 1, 1, 1, 2, 2, 3],
                        "item_id": [10, 11, 12, 13, 14, 20, 21, 30],
                        "ts": [5, 1, 2, 3, 4, 2, 1, 1], "event": "x"})
    rows_of = row_mapper(np.array([10, 11, 12, 13, 14, 20, 21, 30]), "log")
    inputs, targets = training_sequences(log, rows_of, max_history=3)
    # user 1 in time order: 11 12 13 14 10 -> the last 4; user 2: 21 20; user 3: one item, none
    assert inputs.tolist() == [[2, 3, 4], [PAD, PAD, 6]]
    assert targets.tolist() == [[3, 4, 0], [PAD, PAD, 5]]


def test_config_errors_name_the_field_value_and_expectation():
    with pytest.raises(ConfigError,
                       match=r"d_model=30 \(expected a positive multiple of n_heads \(4\)\)"):
        sasrec_config({"d_model": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="unknown key 'layers'"):
        sasrec_config({"layers": 2})
    with pytest.raises(ConfigError, match="loss"):
        sasrec_config({"loss": "bpr"})
    with pytest.raises(ConfigError, match=r"dropout=1.0 \(expected in \[0, 1\)\)"):
        sasrec_config({"dropout": 1.0})


def _random_model(n_items: int = 12, layers: int = 2, seed: int = 0, **cfg) -> Sasrec:
    torch.manual_seed(seed)
    model = Sasrec(n_items, np.ones(n_items, bool),
                   SasrecConfig(**{**SMALL.model_dump(), "n_layers": layers, **cfg})).eval()
    with torch.no_grad():  # spread-out embeddings: no near-ties in the rankings below
        model.item_emb.weight[:n_items].normal_(std=1.0)
    return model


def test_a_later_position_never_changes_an_earlier_output_and_padding_changes_nothing():
    model = _random_model()
    rows = torch.tensor([[PAD, PAD, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10],
                         [PAD, PAD, PAD, PAD, PAD, 11]])
    with torch.no_grad():
        out = model.hidden(rows)
        for t in range(1, 6):
            changed = rows.clone()
            changed[:, t:] = (changed[:, t:] + 1).clamp(min=0) % 12  # later items, PAD -> items too
            other = model.hidden(changed)
            assert torch.allclose(other[:, :t], out[:, :t], atol=1e-6)
            assert not torch.allclose(other[1, t], out[1, t], atol=1e-3)  # position t does see it
        # a prefix alone gives the same states; so does any amount of extra left padding
        assert torch.allclose(model.hidden(rows[1:2, :3])[0], out[1, :3], atol=1e-6)
        padded = torch.cat([torch.full((3, 4), PAD), rows], dim=1)
        assert torch.allclose(model.hidden(padded)[:, 4:][rows >= 0], out[rows >= 0], atol=1e-6)


def _layer_norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def test_full_softmax_and_sampled_losses_equal_hand_computations():
    # no blocks: a position's state is LayerNorm(e_item + p_position), computed here by hand
    n = 5
    warm = np.array([True, True, True, False, True])  # item 3 is cold: in no softmax
    torch.manual_seed(1)
    model = Sasrec(n, warm, SasrecConfig(d_model=4, n_heads=1, n_layers=0, d_ff=4, dropout=0.0,
                                         max_history=3)).eval()
    e = model.item_emb.weight.detach().numpy()[:n].astype(np.float64)
    p = model.pos_emb.weight.detach().numpy().astype(np.float64)
    inputs = torch.tensor([[PAD, 0, 1], [2, 4, 0]])
    targets = torch.tensor([[PAD, 1, 2], [4, 0, PAD]])  # 4 positions with a target
    cases = [(0, 1, 0, 1), (0, 2, 1, 2), (1, 0, 0, 4), (1, 1, 1, 0)]  # (row, col, position, target)
    states = {(b, c): _layer_norm(e[inputs[b, c]] + p[pos]) for b, c, pos, _ in cases}
    full = []
    for b, c, _, y in cases:
        logits = e @ states[b, c]
        full.append(math.log(np.exp(logits[warm]).sum()) - logits[y])
    with torch.no_grad():
        assert math.isclose(float(model.loss(inputs, targets)), np.mean(full), rel_tol=1e-5)

    negatives = torch.tensor([[[0, 0], [4, 0], [1, 2]], [[1, 1], [2, 4], [0, 0]]])
    sampled = []
    for b, c, _, y in cases:
        s = e @ states[b, c]
        neg = s[negatives[b, c].numpy()]
        sampled.append(math.log1p(math.exp(-s[y])) + np.log1p(np.exp(neg)).sum())
    with torch.no_grad():
        assert math.isclose(float(model.loss(inputs, targets, negatives)), np.mean(sampled),
                            rel_tol=1e-5)


def test_recommend_matches_brute_force_scoring_with_distinct_valid_ids(tmp_path):
    n = 12
    ids = np.arange(n) * 7 + 5
    model = _random_model(n)
    rec = SasrecRecommender(ids, model)
    assert isinstance(rec, Recommender) and rec.name == NAME == "sasrec"
    rng = np.random.default_rng(0)
    hist = np.full((9, 8), PAD)
    for r in range(9):
        length = r % 8  # 0 .. 7 items (longer than max_history 6: the newest 6 count)
        if length:
            hist[r, -length:] = ids[rng.integers(0, n, length)]
    items, scores = rec.recommend(hist, 5)
    assert items.shape == scores.shape == (9, 5) and items.dtype == np.int64
    assert scores.dtype == np.float32
    assert np.isin(items, ids).all() and all(len(set(row)) == 5 for row in items)
    emb = model.item_emb.weight[:n].detach()
    for r in range(9):
        rows = torch.as_tensor(rec.rows_of(hist[r, -6:]))
        with torch.no_grad():  # one request alone, no padding: every item scored by hand
            state = model.hidden(rows[rows >= 0][None] if (rows >= 0).any() else rows[-1:][None])
            brute = (emb @ state[0, -1]).numpy()
        order = np.argsort(-brute, kind="stable")[:5]
        assert items[r].tolist() == ids[order].tolist()
        assert np.allclose(scores[r], brute[order], atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()

    path = rec.save(tmp_path / "sasrec.pt")
    again = SasrecRecommender.load(path)
    assert np.array_equal(again.recommend(hist, 5)[0], items)
    excluding = SasrecRecommender(ids, _random_model(n, exclude_history=True))
    slate, _ = excluding.recommend(hist, 5)
    assert not any(set(slate[r]) & set(hist[r][hist[r] >= 0]) for r in range(9))
    with pytest.raises(ContractError, match="ids \\[6\\]"):
        rec.recommend(np.array([[5, 6]]), 3)
    with pytest.raises(ValueError, match="k=13"):
        rec.recommend(hist, 13)


def _rule_table(log: pl.DataFrame, ids: np.ndarray) -> FollowerTable:
    rows_of = row_mapper(ids, "log")
    popularity = np.bincount(rows_of(log["item_id"].to_numpy()), minlength=len(ids))
    return FollowerTable.from_config(log, rows_of, popularity, TransitionConfig())


def test_transition_counts_blend_into_the_score_and_their_weight_is_fitted(tmp_path):
    log, ids, perm = _rule_log()
    table = _rule_table(log, ids)
    cfg = {"transitions": TransitionConfig(weight_grid=(0.0, 1.0, 100.0), weight=1.0)}
    rec = SasrecRecommender(ids, _random_model(len(ids), **cfg), transitions=table)
    assert rec.name == TRANSITIONS_NAME
    hist, targets = _probe(ids, perm)
    items, scores = rec.recommend(hist, 5)
    # brute force: each request's logits over every item plus 1 * log p_T of every item
    rows = torch.as_tensor(rec.rows_of(hist))
    with torch.no_grad():
        logits = rec.model.scores(rows)
    log_t = table.request(rows).log_p(torch.arange(len(ids)).expand(len(rows), -1))
    brute = (logits + log_t).numpy()
    order = np.argsort(-brute, axis=1, kind="stable")[:, :5]
    assert np.array_equal(items, ids[order])
    assert np.allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)

    # an untrained SASRec ranks at random; the counts know the rule: the fit takes the top weight
    found = rec.fit_transition_weight(hist, targets)
    assert list(found) == [0.0, 1.0, 100.0] and rec.cfg.transitions.weight == 100.0
    assert found[100.0] == 1.0 > found[0.0]  # every successor first once the counts dominate
    for w, ndcg in found.items():  # each figure is what serving with that weight scores
        served = SasrecRecommender(ids, _random_model(len(ids), transitions=TransitionConfig(
            weight=w)), transitions=table).recommend(hist, 10)[0]
        assert math.isclose(ndcg, hit_ndcg(served, targets)["ndcg@10"].mean())
    again = SasrecRecommender.load(rec.save(tmp_path / "blend.pt"))
    assert again.cfg.transitions.weight == 100.0 and np.array_equal(
        again.recommend(hist, 5)[0], rec.recommend(hist, 5)[0])
    with pytest.raises(ValueError, match="FollowerTable exactly when"):
        SasrecRecommender(ids, _random_model(len(ids), **cfg))
    with pytest.raises(ValueError, match="no transition counts"):
        SasrecRecommender(ids, _random_model(len(ids))).fit_transition_weight(hist, targets)


# the sampled loss learns slower; its misses are mostly the cold items, whose logit stays
# near 0 (p = 0.5 under its binary loss) while the targets' rise above it
@pytest.mark.parametrize(("loss", "epochs", "hr1"), [("full", 12, 0.95), ("sampled", 30, 0.9)])
def test_it_learns_a_deterministic_next_item_rule_and_leaves_cold_items_at_init(loss, epochs, hr1):
    log, ids, perm = _rule_log()
    cfg = SMALL.model_copy(update={"loss": loss, "negatives": 8, "epochs": epochs})
    rec, summary = train_sasrec(_items(ids), log, cfg, seed=0)
    hist, targets = _probe(ids, perm)
    items, _ = rec.recommend(hist, 1)
    assert (items[:, 0] == targets).mean() >= hr1  # HR@1 over every rule item
    assert summary["counts"] == {"items": 32, "warm_items": 30, "train_interactions": len(log),
                                 "sequences": 240, "train_positions": 240 * 6}
    # the two cold items (never seen): their embeddings are exactly the initial ones
    torch.manual_seed(0)
    init = Sasrec(32, rec.model.warm.numpy(), cfg)
    assert torch.equal(rec.model.item_emb.weight[30:32], init.item_emb.weight[30:32])
    assert not torch.equal(rec.model.item_emb.weight[:30], init.item_emb.weight[:30])


def test_same_seed_same_weights_another_seed_others():
    log, ids, _ = _rule_log(n_users=60)
    cfg = SMALL.model_copy(update={"epochs": 2, "dropout": 0.3, "loss": "sampled", "negatives": 2})
    first = train_sasrec(_items(ids), log, cfg, seed=4)[0].model.state_dict()
    second = train_sasrec(_items(ids), log, cfg, seed=4)[0].model.state_dict()
    other = train_sasrec(_items(ids), log, cfg, seed=5)[0].model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["item_emb.weight"], other["item_emb.weight"])


def test_early_stopping_keeps_the_best_validation_epoch():
    log, ids, perm = _rule_log()
    to_rows = row_mapper(ids, "log")
    inputs, targets = training_sequences(log, to_rows, SMALL.max_history)
    hist, tgt = _probe(ids, perm)
    valid = (to_rows(hist), to_rows(tgt))
    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"epochs": 40, "patience": 2})
    model = Sasrec(len(ids), np.isin(np.arange(len(ids)), inputs), cfg)
    seen = []
    history = fit_sasrec(model, inputs, targets, seed=0, valid=valid, progress=lambda e, loss, s:
                         seen.append({k: v.clone() for k, v in model.state_dict().items()}))
    best = history.best_epoch
    # HR@10 reaches 1 and cannot rise further: training stops `patience` epochs later
    assert history.valid[best] == max(history.valid) == 1.0
    assert history.stopped_early and len(history.valid) == len(history.losses) == best + 1 + 2
    assert all(torch.equal(model.state_dict()[k], seen[best][k]) for k in seen[best])
    assert not torch.equal(seen[best]["item_emb.weight"], seen[-1]["item_emb.weight"])
    assert hit_rate(model, *valid) == 1.0
    with pytest.raises(ValueError, match="validation requests"):
        fit_sasrec(model, inputs, targets, seed=0)


TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "max_history": 6, "epochs": 3,
        "batch_size": 64, "lr": 3e-3, "warmup": 5, "patience": 2}


def test_sasrec_in_the_offline_benchmark_fills_both_tables(tiny_world, tmp_path):
    from quasid.data.dataset import load_dataset
    from quasid.evaluation.offline import SASREC, eval_run, offline_eval

    assert SASREC == NAME
    out = tmp_path / "out"
    res = offline_eval(tiny_world, ["sasrec"], 1, out, sasrec_overrides=TINY, progress=False)
    run = json.loads((out / "runs" / "sasrec" / "seed0" / "metrics.json").read_text())
    assert run["settings"] == {"data": str(tiny_world), "tokenizer": "sasrec", "seed": 0,
                               "sasrec_overrides": TINY, "split": "test"}
    assert run["summary"]["config"]["d_model"] == 16 and run["stack"] == run["retrieval"]
    assert res["settings"]["sasrec_overrides"] == TINY
    assert res["rows"] == res["retrieval_rows"]
    assert [(r["tokenizer"], r["segment"]) for r in res["rows"]] == [("sasrec", "all"),
                                                                      ("sasrec", "cold")]
    md = (out / "results.md").read_text()
    assert md.count("| sasrec | all |") == 2 and md.count("| sasrec | cold |") == 2

    # the same protocol, recomputed from the saved model: last items, full item set
    ds = load_dataset(tiny_world)
    model = SasrecRecommender.load(out / "runs" / "sasrec" / "seed0" / "sasrec.pt")
    cold_ids = ds.items.filter(pl.col("is_cold"))["item_id"].to_numpy()
    for split, interactions, result in (("test", ds.interactions, run), ("valid", None, None)):
        if split == "valid":
            result = eval_run(tiny_world, "sasrec", 0, tmp_path / "valid", split="valid",
                              sasrec_overrides=TINY, save_stack=False)
            interactions = drop_last(ds.interactions)
        hist, targets = loo_requests(interactions, 6)
        slates = model.recommend(hist, 10)[0]
        per = hit_ndcg(slates, targets)
        cold = np.isin(targets, cold_ids)
        assert math.isclose(result["cold_slot_share"], np.isin(slates, cold_ids).mean())
        assert result["n"] == {"all": len(targets), "cold": int(cold.sum())} and cold.any()
        assert math.isclose(result["stack"]["all"]["hr@10"], per["hr@10"].mean())
        assert math.isclose(result["stack"]["cold"]["ndcg@10"], per["ndcg@10"][cold].mean())
        assert 0 <= result["stack"]["all"]["ndcg@10"] <= result["stack"]["all"]["hr@10"] <= 1

    from flows.cli import app  # aggregation of the finished run only: no training

    cli = CliRunner().invoke(app, ["eval", "--data", str(tiny_world), "--tokenizers", "sasrec",
                                   "--seeds", "1", "--out", str(out), "--reuse-only",
                                   "--sasrec-overrides", json.dumps(TINY)])
    assert cli.exit_code == 0, cli.output
    with pytest.raises(RuntimeError, match="sasrec/seed0"):  # other settings: never reused
        offline_eval(tiny_world, ["sasrec"], 1, out, sasrec_overrides={**TINY, "epochs": 2},
                     reuse_only=True, progress=False)


def test_sasrec_with_transitions_in_the_offline_benchmark_fits_its_weight(tiny_world, tmp_path):
    from quasid.evaluation.offline import SASREC_TRANSITIONS, eval_run, sasrec_settings

    assert SASREC_TRANSITIONS == TRANSITIONS_NAME
    overrides = {"transitions": {"weight_grid": [0.0, 2.0]}}
    run = eval_run(tiny_world, TRANSITIONS_NAME, 0, tmp_path / "run", sasrec_overrides=TINY,
                   overrides=overrides)
    assert run["settings"]["transitions"] == TransitionConfig(weight_grid=(0.0, 2.0)).model_dump(
        mode="json")
    again = eval_run(tiny_world, TRANSITIONS_NAME, 0, tmp_path / "run", sasrec_overrides=TINY,
                     overrides=overrides, reuse_only=True)  # the settings read back from JSON match
    assert again == json.loads(json.dumps(run))
    summary = run["summary"]
    assert summary["model"] == TRANSITIONS_NAME
    assert [f["transition_weight"] for f in summary["weight_fit_ndcg@10"]] == [0.0, 2.0]
    best = max(summary["weight_fit_ndcg@10"], key=lambda f: f["ndcg@10"])["transition_weight"]
    assert summary["transition_weight"] == best == summary["config"]["transitions"]["weight"]
    model = SasrecRecommender.load(tmp_path / "run" / "sasrec.pt")
    assert model.transitions is not None and model.cfg.transitions.weight == best
    plain = eval_run(tiny_world, NAME, 0, tmp_path / "plain", sasrec_overrides=TINY,
                     overrides=overrides, save_stack=False)
    assert "transitions" not in plain["settings"] and "transition_weight" not in plain["summary"]
    with pytest.raises(ConfigError, match="sasrec_overrides.transitions"):
        sasrec_settings({"transitions": {}})


def test_the_tuning_script_scores_every_point_on_the_validation_split(tiny_world, tmp_path,
                                                                     monkeypatch, capsys):
    import runpy
    from pathlib import Path

    # the script run as a program, in this process (a subprocess re-imports torch: seconds)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tuning.py"
    out = tmp_path / "tune"
    monkeypatch.setattr("sys.argv", [str(script), "--data", str(tiny_world), "--out", str(out),
                                     "--grid", "tiny", "--epochs", "1"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    tuning = json.loads((out / "tuning.json").read_text())
    points = tuning["points"]
    assert [p["name"] for p in points] == ["lossfull", "losssampled-negatives4"]
    assert tuning["split"] == "valid" and not tuning["failed"]
    best = max(points, key=lambda p: (p["hr@10"], p["ndcg@10"]))
    assert tuning["best"] == best
    assert json.loads((out / "best_overrides.json").read_text()) == best["overrides"]
    for p in points:  # each figure is its run's validation-split metrics, never the test's
        run = json.loads((out / "runs" / p["name"] / "metrics.json").read_text())
        assert run["settings"]["split"] == "valid"
        assert run["settings"]["sasrec_overrides"] == p["overrides"]
        assert p["hr@10"] == run["stack"]["all"]["hr@10"] and p["epochs_run"] == 1
    assert "**best**" in (out / "tuning.md").read_text() and "best overrides" in printed

"""Training: positives from the logs, batches, the fit loop, resume, and the train pipeline."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from quasid.core.schedule import lr_factor, warmup_steps
from quasid.core.schemas import SID_TABLE, read_parquet
from quasid.tokenizer.batches import (
    BatchSampler,
    ConflictRule,
    conflict_neighbours,
    lexicographic_partner,
)
from quasid.tokenizer.metrics import sid_metrics
from quasid.tokenizer.pairs import PairIndex, collaborative_pairs, pair_mask, pairs_to_rows
from quasid.tokenizer.tokenizer import Tokenizer, make_tokenizer
from quasid.tokenizer.train import train_tokenizer
from tests.quasid.sid_testing import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(hidden=[64, 32], latent=16, levels=3, codebook_size=16, tower_dim=16,
            kmeans_iters=5, train=dict(batch_size=128, lr=3e-3))


def tiny(**train) -> dict:
    """TINY with more training settings (nested under `train`, as every override is)."""
    return TINY | {"train": TINY["train"] | train}


def test_collaborative_pairs_within_a_window_and_min_count():
    log = pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 2],
        "item_id": [10, 11, 12, 10, 12, 11, 13],
        "ts": [1, 2, 3, 4, 1, 2, 3],
        "event": ["click"] * 7,
    })
    one = collaborative_pairs(log, window=1)
    # user 1: 10-11, 11-12, 12-10; user 2: 12-11, 11-13
    assert one.rows() == [(10, 11, 1), (10, 12, 1), (11, 12, 2), (11, 13, 1)]
    two = collaborative_pairs(log, window=2)
    # adds user 1: 10-12 (positions 1, 3), 11-10 (2, 4); user 2: 12-13; a self pair 10-10 drops
    assert two.rows() == [(10, 11, 2), (10, 12, 2), (11, 12, 2), (11, 13, 1), (12, 13, 1)]
    assert collaborative_pairs(log, window=2, min_count=2).rows() == [(10, 11, 2), (10, 12, 2),
                                                                      (11, 12, 2)]
    rows = pairs_to_rows(one, np.array([12, 11, 10]))  # item 13 is not a fit item
    assert rows.tolist() == [[1, 0], [2, 0], [2, 1]]  # (row of item_a, row of item_b)


def test_pair_index_mask_and_partners():
    index = PairIndex(np.array([[0, 1], [1, 2], [2, 1], [3, 3]]), n=4)
    assert len(index) == 2 and index.degree().tolist() == [1, 2, 1, 0]
    mask = index.mask(torch.tensor([1, 0, 2, 1, 3]))
    expected = torch.zeros((5, 5), dtype=torch.bool)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        expected[i, j] = expected[j, i] = True
    assert torch.equal(mask, expected)
    # the device-side look-up builds the same mask (a repeated row pairs with each copy)
    assert torch.equal(index.dense_mask(torch.tensor([1, 0, 2, 1, 3])), expected)
    assert not PairIndex(np.zeros((0, 2)), n=4).dense_mask(torch.tensor([0, 1])).any()
    g = torch.Generator().manual_seed(0)
    drawn = index.draw_partner(torch.tensor([0, 3, 1, 1, 1, 1, 1, 1]), g)
    assert drawn[0] == 1 and drawn[1] == -1
    assert set(drawn[2:].tolist()) == {0, 2}


def test_lexicographic_partner_shares_the_longest_prefix():
    codes = torch.tensor([[0, 0, 1], [5, 5, 5], [0, 0, 2], [0, 1, 0], [5, 6, 0]])
    partner = lexicographic_partner(codes, torch.Generator().manual_seed(0))
    # sorted: (0,0,1) (0,0,2) (0,1,0) (5,5,5) (5,6,0)
    assert partner.tolist() == [2, 4, 0, 2, 1]


def test_batch_blocks_hold_anchors_and_their_partners(small_world):
    x = torch.tensor(small_world.content())
    n = x.shape[0]
    pairs = np.stack([np.arange(0, n - 1, 2), np.arange(1, n, 2)], axis=1)
    sampler = BatchSampler(x, x, PairIndex(pairs, n), 64, torch.Generator().manual_seed(0),
                           neighbours=3)
    sampler.new_epoch()
    batch = sampler.batch(0)
    a = 16
    anchors, collab, near = batch.rows[:a], batch.rows[a:2 * a], batch.rows[2 * a:3 * a]
    assert torch.equal(collab, anchors ^ 1)  # pairs (2k, 2k+1): every anchor has one
    assert batch.pair_weight.tolist() == [1.0] * a
    assert all(near[k] in sampler.knn[anchors[k]] for k in range(a))
    assert torch.equal(batch.rows[3 * a:], near)  # no SID partners yet: content neighbours
    # P as a sorted pair list on the CPU (no B x B mask); every (anchor, partner) is in it
    assert batch.positive is None
    assert torch.equal(batch.positive_pairs, PairIndex(pairs, n).batch_pairs(batch.rows))
    listed = set(map(tuple, batch.positive_pairs.tolist()))
    assert all((k, k + a) in listed for k in range(a))
    assert torch.equal(batch.target, batch.anchor + a)
    sampler.set_codes(torch.arange(n)[:, None] // 2)
    assert torch.equal(sampler.batch(1).rows[3 * a:], sampler.batch(1).rows[:a] ^ 1)
    epoch = torch.cat([sampler._order[s * a:(s + 1) * a] for s in range(sampler.steps_per_epoch)])
    assert set(epoch.tolist()) == set(range(n))


def _dense_and_sparse_batches(x: torch.Tensor, pairs: np.ndarray, device: str = "cpu"):
    n = x.shape[0]
    out = {}
    for sparse in (True, False):
        sampler = BatchSampler(x.to(device), x.to(device), PairIndex(pairs, n, device), 64,
                               torch.Generator().manual_seed(3), neighbours=3,
                               near_duplicate=0.9, sparse=sparse)
        sampler.new_epoch()
        out[sparse] = [sampler.batch(s) for s in range(3)]
    return out


@pytest.mark.parametrize("n", [1, 7, 8, 9, 300])
def test_dense_mask_bit_table_equals_the_key_search(n, monkeypatch):
    """The n x n bit table and the sorted-key search give the same P, for catalogue sizes on
    and off a byte boundary, repeated rows and both pair orders; above the table's size cap
    the search answers."""
    import quasid.tokenizer.pairs as pairs_module

    rng = np.random.default_rng(n)
    index = PairIndex(rng.integers(0, n, size=(3 * n, 2)), n=n)
    rows = torch.from_numpy(rng.integers(0, n, size=97))
    searched = index.contains(rows[:, None], rows[None, :])
    assert torch.equal(index.dense_mask(rows), searched)
    assert index._bits is not None and index._bits.numel() == (n * n + 7) // 8
    # the table holds exactly the pairs, both orders, and nothing on the diagonal
    assert sum(v.bit_count() for v in index._bits.tolist()) == 2 * len(index)
    small = PairIndex(rng.integers(0, n, size=(3 * n, 2)), n=n)
    monkeypatch.setattr(pairs_module, "BIT_TABLE_MAX_BYTES", 0)
    assert torch.equal(small.dense_mask(rows), small.contains(rows[:, None], rows[None, :]))
    assert small._bits is None


def test_dense_batches_carry_the_mask_the_pair_lists_give(small_world):
    """Off the CPU the dense path's batches (the accelerators' default) hold P as a B x B mask
    built on the device from the rows: equal to the sparse path's pair list as a mask, from
    the same draws. On the CPU both paths carry the lists (the dense formulas build the mask
    from them)."""
    x = torch.tensor(small_world.content())
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, x.shape[0], size=(4 * x.shape[0], 2))
    on_cpu = _dense_and_sparse_batches(x, pairs)
    for lists, dense in zip(on_cpu[True], on_cpu[False]):
        assert torch.equal(lists.rows, dense.rows) and dense.positive is None
        assert torch.equal(lists.positive_pairs, dense.positive_pairs)
        assert lists.positive_pairs.shape[0] > 0
        # the device-side look-up the accelerators use gives the lists' mask
        index = PairIndex(pairs, x.shape[0])
        assert torch.equal(index.dense_mask(lists.rows), pair_mask(lists.positive_pairs, 64))
    if torch.cuda.is_available():
        on_gpu = _dense_and_sparse_batches(x, pairs, "cuda")
        for lists, dense in zip(on_gpu[True], on_gpu[False]):
            assert torch.equal(lists.rows, dense.rows)
            assert dense.positive_pairs is None and dense.near_pairs is None  # sparse path's
            assert torch.equal(dense.positive, pair_mask(lists.positive_pairs, 64))


def test_conflict_neighbours_follow_the_repulsion_masks():
    # item 0's neighbours 1, 2, 3; codes: 1 equal to 0 (H = 0), 2 one level off, 3 all off
    codes = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 9], [7, 8, 9]])
    knn = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    cos = torch.tensor([[0.99, 0.95, 0.9]] * 4)
    positives = PairIndex(np.array([[0, 2]]), 4)
    hamr = conflict_neighbours(codes, knn, cos, positives, ConflictRule(1, 0.98, True))
    # 0-1 is a near-duplicate (0.99 > 0.98), 0-2 a collaborative positive, 0-3 too far
    assert hamr[0].tolist() == [False, False, False]
    # 1-0 and 1-2: 0.99 again for the first column, 1-2 (H = 1, 0.95, no positive) is live
    assert hamr[1].tolist() == [False, True, False]
    uniform = conflict_neighbours(codes, knn, cos, positives, ConflictRule(0))
    assert uniform[0].tolist() == [True, False, False]  # full collisions only, no exemption
    assert uniform[3].tolist() == [False, False, False]


def test_conflict_mining_draws_a_live_conflict_when_there_is_one(small_world):
    x = torch.tensor(small_world.content())
    n = x.shape[0]
    pairs = np.zeros((0, 2), dtype=np.int64)
    sampler = BatchSampler(x, x, PairIndex(pairs, n), 64, torch.Generator().manual_seed(0),
                           neighbours=4, conflicts=ConflictRule(0))
    codes = torch.arange(n)[:, None].repeat(1, 3)  # all distinct: no conflict anywhere
    # some even items collide with their third content neighbour (an odd one, used once)
    target = sampler.knn[:, 2]
    chosen = (torch.arange(n) % 2 == 0) & (target % 2 == 1)
    candidates = np.flatnonzero(chosen.numpy())
    _, once = np.unique(target.numpy()[candidates], return_index=True)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[candidates[once]] = True
    codes[target[chosen]] = codes[chosen]
    sampler.set_codes(codes)
    live = sampler.conflict
    assert live[chosen, 2].all()
    sampler.new_epoch()
    a = 16
    for step in range(sampler.steps_per_epoch):
        batch = sampler.batch(step)
        anchors, near = batch.rows[:a], batch.rows[2 * a:3 * a]
        has = live[anchors].any(dim=1)
        picked = (sampler.knn[anchors] == near[:, None]).float().argmax(dim=1)
        assert live[anchors[has], picked[has]].all()  # with a conflict: always a conflict
        assert all(near[k] in sampler.knn[anchors[k]] for k in range(a))


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, warmup_steps(0.1, 100), 0.05) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.05, abs=1e-3)


def _fit_data(small_world):
    from quasid.data.splits import training_interactions

    warm = ~small_world.items["is_cold"].to_numpy()
    ids = small_world.items["item_id"].to_numpy()[warm]
    pairs = collaborative_pairs(training_interactions(small_world), window=2)
    return small_world.content()[warm], pairs_to_rows(pairs, ids)


def test_a_tiny_cpu_fit_lowers_the_loss_and_the_collision_rate(small_world):
    content, rows = _fit_data(small_world)
    tok = make_tokenizer("quasid", tiny(epochs=10))
    history = tok.fit(content, rows)
    first, last = history["epochs"][0], history["epochs"][-1]
    assert last["total"] < 0.5 * first["total"]
    assert last["rec"] < 0.8 * first["rec"]
    assert last["collision_rate"] < 0.6 * first["collision_rate"]
    assert last["cvpm_excluded"]["self"] > 0 and last["valid_pairs"] > 0
    final = sid_metrics(tok.encode(content), 16)
    assert final["collision_rate"] == pytest.approx(last["collision_rate"])


@pytest.mark.parametrize("mine", [False, True])
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(small_world, tmp_path, mine):
    content, rows = _fit_data(small_world)
    cfg = tiny(epochs=4, checkpoint_every=1, mine_conflicts=mine)
    straight = make_tokenizer("rqvae+hamr", cfg)
    straight.fit(content, rows)

    class Crash(Exception):
        pass

    def crash_after_two(record):
        if record["epoch"] == 2:
            raise Crash

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Crash):
        make_tokenizer("rqvae+hamr", cfg).fit(content, rows, checkpoint=ckpt,
                                              callback=crash_after_two)
    resumed = make_tokenizer("rqvae+hamr", cfg)
    history = resumed.fit(content, rows, checkpoint=ckpt)
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert np.array_equal(resumed.encode(content), straight.encode(content))
    for va, vb in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(va, vb)


def test_a_checkpoint_from_before_a_new_field_still_resumes(tmp_path):
    from quasid.tokenizer.config import tokenizer_config
    from quasid.tokenizer.fit import _load_checkpoint

    cfg = tokenizer_config("uniform", {"content_dim": 4})
    path = tmp_path / "checkpoint.pt"

    def saved(config: dict):
        torch.save({"config": config, "epoch": 3}, path)
        return _load_checkpoint(path, cfg)

    older = cfg.to_dict()
    del older["uniform_tau_dup"]  # written before the field existed: it meant the default
    assert saved(older)["epoch"] == 3
    assert saved(cfg.to_dict() | {"uniform_tau_dup": 0.9}) is None  # another training
    assert saved(cfg.to_dict() | {"no_such_field": 1}) is None


def test_train_tokenizer_writes_every_output(small_world_dir, small_world, tmp_path):
    out = tmp_path / "quasid"
    metrics = train_tokenizer(small_world_dir, "quasid", out, epochs=2, seed=3,
                              overrides={k: v for k, v in TINY.items()})
    for name in ("sids.parquet", "tokenizer.pt", "tokenizer.json", "metrics.json",
                 "history.json", "training.png", "checkpoint.pt"):
        assert (out / name).exists(), name
    table = read_parquet(out / "sids.parquet", SID_TABLE)
    items = small_world.items
    assert table["item_id"].to_list() == sorted(items["item_id"].to_list())  # cold ones too
    assert set(table["tokenizer"].to_list()) == {"quasid"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["collision_rate"] == metrics["collision_rate"]
    for key in ("collision_rate", "unique_sids", "sid_entropy", "codebook_utilization",
                "harmful_collision_rate", "benign_collision_rate"):
        assert key in saved
    codes = np.array(table["sid"].to_list())
    again = sid_metrics(codes, 16, table["item_id"].to_numpy(), small_world.world)
    assert again["collision_rate"] == pytest.approx(saved["collision_rate"])
    assert again["harmful_collision_rate"] == pytest.approx(saved["harmful_collision_rate"])
    assert metrics["fit_items"] == int((~items["is_cold"]).sum())
    # the saved tokenizer reproduces the table's SIDs from content alone
    loaded = Tokenizer.load(out)
    assert np.array_equal(loaded.encode(small_world.content()), codes)


def test_train_cli(small_world_dir, tmp_path):
    from flows.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--data", str(small_world_dir), "--tokenizer",
                                      "rqkmeans", "--out", str(out), "--seed", "1",
                                      "--overrides", '{"codebook_size": 16}'])
    assert result.exit_code == 0, result.output
    assert "collision_rate" in result.output
    assert json.loads((out / "metrics.json").read_text())["codebook_size"] == 16
    bad = CliRunner().invoke(app, ["train", "--data", str(small_world_dir), "--tokenizer", "tiger",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "unknown tokenizer 'tiger'" in str(bad.exception)
    assert not (tmp_path / "bad" / "sids.parquet").exists()

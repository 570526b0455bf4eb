"""The training probe (quasid.tokenizer.diagnostics) against hand-computed tiny batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from quasid.tokenizer import losses as L
from quasid.tokenizer.batches import Batch
from quasid.tokenizer.config import tokenizer_config
from quasid.tokenizer.diagnostics import (
    PROBE_REASONS,
    PairProbe,
    _occurrences,
    cvpm_reasons,
    world_pair_rows,
)
from quasid.tokenizer.tokenizer import make_tokenizer
from quasid.tokenizer.train import train_tokenizer
from tests.quasid.sid_testing import one_thread  # noqa: F401 (autouse fixture)


def test_cvpm_reasons_reproduce_the_mask_and_its_counts():
    g = torch.Generator().manual_seed(3)
    b = 40
    items = torch.randint(0, 25, (b,), generator=g)  # repeats: same_item pairs
    codes = torch.randint(0, 3, (b, 3), generator=g)
    ham = L.hamming(codes)
    cos = torch.rand((b, b), generator=g)
    cos = (cos + cos.T) / 2 * 0.1 + 0.9  # straddles τ_dup = 0.98
    positive = torch.rand((b, b), generator=g) < 0.1
    positive = positive | positive.T
    cv = L.cvpm_mask(items, ham, cos, positive, 0.98, 1)
    reason = cvpm_reasons(torch.eye(b, dtype=torch.bool), items[:, None] == items[None, :],
                          positive, cos, ham, 0.98, 1)
    assert torch.equal(reason == PROBE_REASONS.index("valid"), cv.mask)
    counts = torch.bincount(reason.flatten(), minlength=len(PROBE_REASONS))
    assert counts[:-1].tolist() == cv.excluded.tolist()
    assert counts.sum() == b * b and all(c > 0 for c in counts.tolist())


def test_occurrences_enumerate_every_position_combination():
    rows = torch.tensor([5, 3, 5, 7, 7, 1])
    pairs = torch.tensor([[5, 7], [3, 1], [2, 3]])
    k, i, j = _occurrences(rows, pairs)
    found = sorted(zip(k.tolist(), i.tolist(), j.tolist()))
    # 5 at positions 0, 2 and 7 at 3, 4: four combinations; 3-1 once; item 2 absent
    assert found == [(0, 0, 3), (0, 0, 4), (0, 2, 3), (0, 2, 4), (1, 1, 5)]


def test_world_pair_rows_keeps_pairs_of_fit_items_only():
    pairs = np.array([[10, 11], [11, 30], [12, 10]])
    assert world_pair_rows(pairs, np.array([12, 11, 10])).tolist() == [[2, 1], [0, 2]]


class _Lookup(torch.nn.Module):
    """A stub quantizer: the codes of the item whose latent is nearest (latents are distinct)."""

    def __init__(self, latents: torch.Tensor, codes: torch.Tensor):
        super().__init__()
        self.latents, self.table = latents, codes

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.table[torch.cdist(z, self.latents).argmin(dim=1)]


class _Stub(torch.nn.Module):
    def __init__(self, latents: torch.Tensor, codes: torch.Tensor):
        super().__init__()
        self.encoder = torch.nn.Identity()  # the content rows are the latents
        self.quantizer = _Lookup(latents, codes)


def _tiny():
    """8 items with 2-d latents; look-alike pairs (0, 2) (H = 0, d = 1, content cos 0.9) and
    (1, 7) (H = 1, content cos 0.99); near-duplicate pair (0, 3), a collaborative positive."""
    s3 = math.sqrt(3) / 2
    latents = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.5, s3], [0.0, 1.0], [-1.0, 0.0],
                            [0.0, -1.0], [-0.6, -0.8], [0.6, 0.8]])
    codes = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [9, 9, 9], [10, 10, 10],
                          [11, 11, 11], [12, 12, 12], [4, 5, 7]])
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, math.sqrt(1 - 0.81)], [1.0, 0.0],
                         [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [math.sqrt(1 - 0.99**2), 0.99]])
    # A = 2 anchors (items 0, 1); blocks: collab (3, 4), knn (2, 5), sid (6, 7)
    rows = torch.tensor([0, 1, 3, 4, 2, 5, 6, 7])
    batch = Batch(rows=rows, x=latents[rows], unit=unit[rows], positive=None,
                  anchor=torch.tensor([0, 1]), target=torch.tensor([2, 3]),
                  pair_weight=torch.tensor([1.0, 0.0]))
    groups = {"harmful": np.array([[0, 2], [1, 7]]), "benign": np.array([[0, 3]])}
    return _Stub(latents, codes), batch, groups, latents


@pytest.mark.parametrize("name,overrides,push", [
    # HaMR: pair (0, 2) valid, s = 1, m = 2·0.6, d = 1: 4·20·1·(1.2 − 1)/8 = 2.0; (1, 7) is
    # a near-duplicate by content (0.99 > 0.98), not pushed
    ("quasid", {}, 2.0),
    # uniform: (0, 2) has H = 0 ≤ h_u: 4·20·(1.2 − 1)/8 = 2.0; (1, 7) has H = 1 > h_u
    ("uniform", {}, 2.0),
    # uniform exempting content cosines above 0.85: (0, 2) at 0.9 is exempt
    ("uniform", {"uniform_tau_dup": 0.85}, 0.0),
    ("rqvae", {}, 0.0),
])
def test_probe_step_and_epoch_hand_computed(name, overrides, push):
    model, batch, groups, latents = _tiny()
    probe = PairProbe(groups, np.array([[0, 3]]), 8, tokenizer_config(name, overrides),
                      reference_pairs=64)
    probe.step(model, batch)
    out = probe.epoch(model, latents, model.quantizer.table)
    harm, benign = out["harmful"], out["benign"]
    assert out["steps"] == 1
    assert harm["occurrences"] == 2 and harm["met_share"] == 1.0
    assert harm["reasons"]["valid"] == 1 and harm["reasons"]["near_duplicate"] == 1
    assert harm["step_hamming_hist"] == [1, 1, 0, 0] and harm["hamming_hist"] == [1, 1, 0, 0]
    assert harm["rate_h_le_1"] == 1.0
    # (0, 2) is anchor 0's knn partner (position 4 = 0 + 2A), (1, 7) anchor 1's sid partner
    assert harm["planted"] == {"collab": 0, "knn": 1, "sid": 1}
    assert harm["contrastive_positive"] == 0
    assert harm["pushed_share"] == (0.5 if push else 0.0)
    assert harm["mean_push"] == pytest.approx(push / 2, abs=1e-5)  # per occurrence
    # d(0, 2) = 1, d(1, 7) = √(2 − 2·0.96) = √0.08
    assert harm["mean_distance"] == pytest.approx((1.0 + math.sqrt(0.08)) / 2, abs=1e-4)
    # (0, 3): the planted collab partner of anchor 0 with a real positive; CVPM: collaborative
    assert benign["collaborative_share"] == 1.0 and harm["collaborative_share"] == 0.0
    assert benign["reasons"]["collaborative"] == 1 and benign["contrastive_positive"] == 1
    assert benign["planted"]["collab"] == 1
    assert harm["escaped"] == 0 and harm["returned"] == 0  # no previous epoch
    # the counters restart after an epoch; pair (1, 7) moves to H = 3, then back to H = 0
    codes = model.quantizer.table.clone()
    codes[7] = torch.tensor([13, 13, 13])
    again = probe.epoch(model, latents, codes)
    assert again["harmful"]["occurrences"] == 0 and again["harmful"]["met_share"] == 0.0
    assert again["harmful"]["escaped"] == 1 and again["harmful"]["returned"] == 0
    codes[7] = codes[1]
    back = probe.epoch(model, latents, codes)
    assert back["harmful"]["escaped"] == 0 and back["harmful"]["returned"] == 1
    assert back["harmful"]["hamming_hist"] == [2, 0, 0, 0]


def test_probe_rejects_bad_groups():
    cfg = tokenizer_config("quasid")
    with pytest.raises(ValueError, match="no pair groups"):
        PairProbe({}, np.zeros((0, 2)), 4, cfg)
    with pytest.raises(ValueError, match=r"group 'x' has rows outside \[0, 4\)"):
        PairProbe({"x": np.array([[0, 4]])}, np.zeros((0, 2)), 4, cfg)


TINY = {"hidden": [32], "latent": 8, "levels": 3, "codebook_size": 16, "tower_dim": 8,
        "kmeans_iters": 5, "train": {"batch_size": 64, "epochs": 2}}


def test_a_probe_leaves_the_fit_unchanged(small_world):
    content = small_world.content()
    pairs = np.stack([np.arange(0, 60, 2), np.arange(1, 61, 2)], axis=1)
    plain = make_tokenizer("quasid", TINY)
    plain_history = plain.fit(content, pairs)
    probed = make_tokenizer("quasid", TINY)
    probe = PairProbe({"some": pairs[:10]}, pairs, len(content), probed.config)
    probed_history = probed.fit(content, pairs, probe=probe)
    assert np.array_equal(plain.encode(content), probed.encode(content))
    for a, b in zip(plain_history["epochs"], probed_history["epochs"]):
        assert a["total"] == b["total"] and "probe" in b and "probe" not in a
        assert b["probe"]["some"]["pairs"] == 10 and b["probe"]["steps"] > 0


def test_train_tokenizer_diagnose_writes_the_probe(small_world_dir, tmp_path):
    train_tokenizer(small_world_dir, "quasid", tmp_path / "t", epochs=1, diagnose=True,
                    overrides=TINY)
    history = json.loads((tmp_path / "t" / "history.json").read_text())
    probe = history["epochs"][0]["probe"]
    assert probe["harmful"]["pairs"] > 0 and probe["benign"]["pairs"] > 0
    assert sum(probe["harmful"]["hamming_hist"]) == probe["harmful"]["pairs"]


def test_uniform_tau_dup_exempts_near_duplicate_content_from_uniform_repulsion():
    from quasid.tokenizer.model import SIDModel

    cfg = tokenizer_config("uniform", TINY | {"content_dim": 4})
    g = torch.Generator().manual_seed(0)
    x = torch.randn((6, 4), generator=g)
    x[1] = x[0] * 1.001  # cosine 1 with row 0: the same codes, H = 0
    batch = Batch(rows=torch.arange(6), x=x, unit=torch.nn.functional.normalize(x, dim=1),
                  positive=None, anchor=torch.tensor([0]), target=torch.tensor([1]),
                  pair_weight=torch.tensor([0.0]))
    counts = {}
    for tau in (2.0, 0.98):
        torch.manual_seed(0)
        model = SIDModel(tokenizer_config("uniform", TINY | {"content_dim": 4,
                                                             "uniform_tau_dup": tau}))
        model.set_standardization(x)
        _, terms = model.losses(batch, 0.0)
        counts[tau] = int(terms["uniform_pairs"])
    # the pair (0, 1) in both orders leaves the mask; nothing else changes
    assert counts[2.0] >= 2 and counts[0.98] == counts[2.0] - 2
    assert cfg.uniform_tau_dup == 2.0


@pytest.mark.parametrize("sparse", [False, True])
def test_force_attribution_predicts_an_adamw_step(small_world, sparse):
    """The per-term forces sum to the first-order change of the group's mean distance that
    one AdamW step actually makes (momentum off, so the step is the current gradient's), on
    the dense and the sparse pair-term path."""
    from quasid.tokenizer.batches import BatchSampler
    from quasid.tokenizer.pairs import PairIndex

    x = torch.tensor(small_world.content()[:300])
    n = len(x)
    pairs = np.stack([np.arange(0, 200, 2), np.arange(1, 201, 2)], axis=1)
    tiny = TINY | {"train": TINY["train"] | {"grad_clip": 0.0}}
    tok = make_tokenizer("quasid", tiny)
    model = tok._build(x.shape[1])
    model.set_standardization(x)
    model.sparse_pairs = sparse
    g = torch.Generator().manual_seed(0)
    sampler = BatchSampler(model.standardize(x), x, PairIndex(pairs, n), 64, g,
                           near_duplicate=tok.config.tau_dup)
    model.quantizer.init_kmeans(model.encoder(sampler.x).detach(), g, 3)
    sampler.new_epoch()
    batch = sampler.batch(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.0, 0.999), weight_decay=1e-2)

    def step():
        total, _ = model.losses(batch, 0.0)
        opt.zero_grad()
        total.backward()
        opt.step()

    for _ in range(3):  # the same batch: Adam's second moment settles on this gradient
        step()
    group = torch.from_numpy(pairs[:30])

    def mean_distance() -> float:
        with torch.no_grad():
            unit = torch.nn.functional.normalize(model.encoder(sampler.x), dim=1)
            return float((unit[group[:, 0]] - unit[group[:, 1]]).norm(dim=1).mean())

    probe = PairProbe({"g": pairs[:30]}, pairs, n, tok.config, forces_every=1)
    before = mean_distance()
    probe.step(model, batch, opt, 0.0, sampler.x)
    step()
    forces = probe.epoch(model, sampler.x, model.codes(x))["g"]["forces"]
    assert set(forces) == {"rec", "rq", "hamr", "contrastive", "weight_decay"}
    moved = mean_distance() - before
    assert moved != 0.0
    assert sum(forces.values()) == pytest.approx(moved, rel=0.05)

"""Tokenizer interface: registry, fit on CPU, determinism, encode new items, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quasid.tokenizer.batches import BatchSampler
from quasid.tokenizer.config import PRESETS, tokenizer_config
from quasid.tokenizer.pairs import PairIndex
from quasid.tokenizer.tokenizer import Tokenizer, make_tokenizer
from tests.quasid.sid_testing import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(hidden=[32], latent=8, levels=2, codebook_size=16, tower_dim=8, kmeans_iters=5,
            train=dict(batch_size=64, epochs=3))


@pytest.fixture(scope="module")
def content(small_world) -> np.ndarray:
    return small_world.content()


def _pairs(n: int) -> np.ndarray:
    return np.stack([np.arange(0, n - 1, 3), np.arange(1, n, 3)], axis=1)


def test_registry_names_and_presets():
    assert set(PRESETS) == {"rqvae", "rqkmeans", "quasid", "adasid", "uniform", "rqvae+hamr",
                            "adasid+hamr"}
    q = tokenizer_config("quasid")
    assert q.hamr and q.contrastive and not q.adasid and not q.uniform
    assert (q.hidden, q.latent, q.levels, q.codebook_size) == ((512, 256, 128), 32, 3, 256)
    assert tokenizer_config("rqvae+hamr").hamr and not tokenizer_config("rqvae+hamr").contrastive
    plug = tokenizer_config("adasid+hamr")
    assert plug.adasid and plug.hamr
    assert tokenizer_config("quasid", {"train": {"epochs": 7}, "latent": 4}).train.epochs == 7
    with pytest.raises(ValueError, match="unknown tokenizer 'tiger'"):
        make_tokenizer("tiger")
    with pytest.raises(ValueError, match="tokenizer 'rqvae': unknown key 'latnet'"):
        tokenizer_config("rqvae", {"latnet": 4})


@pytest.mark.parametrize("name,terms", [
    ("rqvae", {"rec", "rq"}),
    ("quasid", {"rec", "rq", "hamr", "contrastive"}),
    ("rqvae+hamr", {"rec", "rq", "hamr"}),
    ("adasid", {"rec", "rq", "adasid"}),
    ("adasid+hamr", {"rec", "rq", "adasid", "hamr"}),
    ("uniform", {"rec", "rq", "uniform"}),
])
def test_each_tokenizer_trains_its_own_loss_terms(content, name, terms):
    tok = make_tokenizer(name, TINY)
    model = tok._build(content.shape[1])
    x = torch.tensor(content)
    model.set_standardization(x)
    g = torch.Generator().manual_seed(0)
    sampler = BatchSampler(model.standardize(x), x, PairIndex(_pairs(len(x)), len(x)), 64, g)
    model.quantizer.init_kmeans(model.encoder(sampler.x).detach(), g, 3)
    sampler.new_epoch()
    total, out = model.losses(sampler.batch(0), progress=0.5)
    loss_terms = {"rec", "rq", "hamr", "contrastive", "adasid", "uniform"}
    assert {k for k in out if k in loss_terms} == terms
    cfg = tok.config
    weights = {"rec": 1, "rq": 1, "hamr": cfg.hamr_weight, "contrastive": cfg.contrastive_weight,
               "adasid": cfg.adasid_weight, "uniform": cfg.uniform_weight}
    parts = sum(out[k] * w for k, w in weights.items() if k in out)
    assert total.item() == pytest.approx(parts.item(), rel=1e-5)


def test_fit_is_deterministic_on_cpu_and_depends_on_the_seed(content):
    pairs = _pairs(len(content))
    a, b = make_tokenizer("quasid", TINY), make_tokenizer("quasid", TINY)
    a.fit(content, pairs)
    b.fit(content, pairs)
    assert np.array_equal(a.encode(content), b.encode(content))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    c = make_tokenizer("quasid", TINY | {"train": TINY["train"] | {"seed": 1}})
    c.fit(content, pairs)
    assert not torch.equal(a.model.encoder.net[0].weight, c.model.encoder.net[0].weight)


@pytest.mark.parametrize("name", ["quasid", "rqkmeans"])
def test_save_load_gives_identical_codes(tmp_path, content, name):
    tok = make_tokenizer(name, TINY)
    tok.fit(content[:500], _pairs(500))
    tok.save(tmp_path / name)
    assert (tmp_path / name / "tokenizer.json").exists()
    loaded = Tokenizer.load(tmp_path / name)
    assert loaded.config == tok.config
    # items 500..599 were never seen in training: encoded from content alone
    assert np.array_equal(loaded.encode(content), tok.encode(content))
    codes = loaded.encode(content[500:])
    assert codes.shape == (100, 2) and codes.min() >= 0 and codes.max() < 16


def test_encode_checks_its_input(content):
    tok = make_tokenizer("rqkmeans", TINY)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(content)
    tok.fit(content)
    with pytest.raises(ValueError, match=r"content must be \(n, 16\)"):
        tok.encode(content[:, :8])
    with pytest.raises(ValueError, match="NaN"):
        make_tokenizer("rqvae", TINY).fit(np.full((4, 3), np.nan, dtype=np.float32))


def test_rqkmeans_codes_are_residual_kmeans_of_standardized_content(content):
    tok = make_tokenizer("rqkmeans", TINY)
    tok.fit(content)
    model = tok.model
    x = model.standardize(torch.tensor(content))
    first = model.quantizer.codebooks[0]
    nearest0 = torch.cdist(x, first).argmin(dim=1)
    assert torch.equal(torch.from_numpy(tok.encode(content)[:, 0]), nearest0)
    assert model.quantizer.codebooks.shape == (2, 16, content.shape[1])

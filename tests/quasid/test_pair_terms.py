"""The sparse pair terms (`quasid.tokenizer.pair_terms`) against a straightforward dense
reference written here: pair sets, CVPM's counts, the losses' values and gradients, and the
whole `SIDModel.losses` on both paths."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from quasid.tokenizer import pair_terms as P
from quasid.tokenizer.batches import BatchSampler, content_neighbours
from quasid.tokenizer.fit import all_codes, conflict_rule
from quasid.tokenizer.pairs import PairIndex
from quasid.tokenizer.tokenizer import make_tokenizer

EPS = 1e-8
REASONS = ("self", "same_item", "collaborative", "near_duplicate", "far")


# ---- the reference: every formula of docs/design.md 2.1 as a dense B x B expression ----

def ref_distances(z):
    unit = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
    return torch.sqrt((2 - 2 * unit @ unit.T).clamp_min(0) + EPS)


def ref_hamming(codes):
    return (codes[:, None, :] != codes[None, :, :]).sum(dim=2)


def ref_cvpm(items, codes, cos, positive, tau, h_max):
    """(valid mask, {reason: ordered pairs}), reasons attributed pair by pair, first match."""
    b = len(items)
    ham = ref_hamming(codes)
    counts = dict.fromkeys(REASONS, 0)
    valid = torch.zeros((b, b), dtype=torch.bool)
    for i, j in itertools.product(range(b), range(b)):
        tests = (i == j, bool(items[i] == items[j]), bool(positive[i, j]), bool(cos[i, j] > tau),
                 bool(ham[i, j] > h_max))
        reason = next((r for r, hit in zip(REASONS, tests) if hit), None)
        if reason is None:
            valid[i, j] = True
        else:
            counts[reason] += 1
    return valid, counts


def ref_hamr(z, codes, valid, margin, gamma):
    s = 1 - ref_hamming(codes).to(z.dtype) / codes.shape[1]
    hinge = torch.relu(margin * (1 + s) - ref_distances(z))
    return (valid * s ** gamma * hinge ** 2).sum() / len(z)


def ref_uniform(z, items, codes, h_u, margin):
    mask = (items[:, None] != items[None, :]) & (ref_hamming(codes) <= h_u)
    return (mask * torch.relu(margin - ref_distances(z)) ** 2).sum() / len(z), mask


def ref_adasid(z, items, codes, cos, positive, rho, margin):
    b = codes.shape[0]
    agree = (codes[:, None, :] == codes[None, :, :]).long()
    prefix = agree.cumprod(dim=2).sum(dim=2)
    # load_ij = share of rows whose first p_ij codes equal row i's
    load = torch.stack([(prefix[i] >= prefix[i][:, None]).sum(dim=1) for i in range(b)])
    load = load.to(z.dtype) / b
    compat = torch.maximum(positive.to(z.dtype), cos.clamp_min(0))
    w = (items[:, None] != items[None, :]) * (prefix >= 1) * (1 - compat) * load
    hinge = torch.relu(margin - ref_distances(z))
    return rho * (w * hinge ** 2).sum() / w.sum().clamp_min(EPS), w


def dense_of(pairs, b):
    m = torch.zeros((b, b), dtype=torch.bool)
    m[pairs[:, 0], pairs[:, 1]] = m[pairs[:, 1], pairs[:, 0]] = True
    return m


def unordered(mask):
    return torch.nonzero(torch.triu(mask, 1))


def random_batch(seed, b=37, levels=3, k=3, dtype=torch.float64):
    """Few codes per level (many ties and collisions), duplicated items, positives, and two
    near-duplicate contents."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, b // 2, (b,), generator=g)
    items[:4] = torch.tensor([0, 1, 0, 1])
    codes = torch.randint(0, k, (b, levels), generator=g)
    per_item = torch.randn(b // 2, 6, generator=g, dtype=dtype)
    per_item[1] = per_item[0] + 1e-3  # items 0 and 1 are near-duplicates
    content = per_item[items]
    unit = content / content.norm(dim=1, keepdim=True)
    pos = torch.rand(b, b, generator=g) < 0.1
    positive = (pos | pos.T) & (items[:, None] != items[None, :])
    z = torch.randn(b, 4, generator=g, dtype=dtype)
    return items, codes, unit, positive, z


# ---- pair sets ----

@pytest.mark.parametrize("seed", range(3))
def test_close_pairs_are_every_pair_within_the_hamming_radius(seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (29, 3), generator=g)
    ham = ref_hamming(codes)
    for h in range(5):
        pairs = P.close_pairs(codes, h)
        assert torch.equal(pairs, unordered(ham <= h)), h  # sorted (i, j), each once
        assert torch.equal(P.pair_hamming(codes, pairs), ham[pairs[:, 0], pairs[:, 1]])
    same = P.equal_key_pairs(codes[:, 1])
    assert torch.equal(same, unordered(codes[:, 1, None] == codes[None, :, 1]))
    assert P.equal_key_pairs(torch.arange(5)).shape == (0, 2)  # no ties: no pairs


def test_batch_positive_pairs_match_the_key_lookup():
    rng = np.random.default_rng(0)
    index = PairIndex(rng.integers(0, 40, size=(120, 2)), n=40)
    rows = torch.tensor(rng.integers(0, 40, size=53))  # duplicates: each copy pairs
    keys = {(int(a), int(b)) for a, b in np.stack([index.keys // 40, index.keys % 40], 1)}
    expected = torch.tensor([[i, j] for i, j in itertools.combinations(range(53), 2)
                             if (min(rows[i], rows[j]).item(), max(rows[i], rows[j]).item())
                             in keys])
    assert torch.equal(index.batch_pairs(rows), expected)
    assert torch.equal(index.mask(rows), dense_of(expected, 53))
    empty = PairIndex(np.zeros((0, 2), dtype=np.int64), n=5)
    assert empty.batch_pairs(torch.tensor([0, 1, 1])).shape == (0, 2)


@pytest.mark.parametrize("block", [1, 37 * 3, 37 * 7, 10_000])  # 1 row, 3 and 7 rows, all
def test_cosine_scan_counts_all_pairs_and_reads_the_probes(block):
    _, _, unit, _, _ = random_batch(0, dtype=torch.float32)
    cos = unit @ unit.T
    probes = torch.tensor([[36, 0], [0, 36], [5, 5], [3, 17], [17, 3], [0, 1]])
    above, values = P.cosine_scan(unit, probes, 0.3, block)
    assert int(above) == int((cos > 0.3).sum())
    torch.testing.assert_close(values, cos[probes[:, 0], probes[:, 1]], rtol=0, atol=1e-6)


# ---- CVPM and the losses against the reference ----

def _cvpm(items, codes, unit, positive, tau, h_max, listed=False):
    """CVPM on the sparse pairs; near-duplicates found by the scan, or `listed` as the
    sampler lists them (distinct items, cos > tau)."""
    close = P.close_pairs(codes, h_max)
    near = unordered((unit @ unit.T > tau) & (items[:, None] != items[None, :])) if listed \
        else None
    return P.cvpm_pairs(items, codes, close, P.pair_hamming(codes, close), unit,
                        unordered(positive), tau, h_max, near, block=100)


@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("seed,h_max", [(0, 1), (1, 0), (2, 2), (3, 1)])
def test_cvpm_pairs_match_the_dense_mask_and_counts(seed, h_max, listed):
    items, codes, unit, positive, _ = random_batch(seed)
    cos = unit @ unit.T
    valid, counts = ref_cvpm(items, codes, cos, positive, 0.98, h_max)
    cv = _cvpm(items, codes, unit, positive, 0.98, h_max, listed)
    assert counts["same_item"] > 0 and counts["collaborative"] > 0  # the batch has each reason
    assert counts["near_duplicate"] > 0 and valid.any()
    assert dict(zip(REASONS, cv.excluded.tolist())) == counts
    assert torch.equal(dense_of(cv.pairs, len(items)), valid)
    assert int(cv.excluded.sum()) + 2 * len(cv.pairs) == len(items) ** 2


def test_content_neighbours_list_the_near_duplicate_pairs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 5, generator=g)
    unit = torch.nn.functional.normalize(torch.cat([base, base[:6] + 0.05]), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    knn, near = content_neighbours(unit, 2, chunk=7, above=0.98)  # chunks of 7 rows
    assert torch.equal(near, unordered(cos > 0.98)) and len(near) >= 6
    assert torch.equal(knn[:, 0], cos.argmax(dim=1))
    assert content_neighbours(unit, 2)[1] is None


@pytest.mark.parametrize("listed", [False, True])
def test_cvpm_pairs_when_every_pair_is_masked(listed):
    items, codes, unit, positive, z = random_batch(0)
    one_item = torch.zeros_like(items)  # the same item 37 times
    cv = _cvpm(one_item, codes, unit[:1].expand_as(unit), positive & False, 0.98, 1, listed)
    assert cv.excluded.tolist() == [37, 37 * 36, 0, 0, 0] and cv.pairs.shape == (0, 2)
    unit_z = P.unit_latent(z.requires_grad_())
    loss = P.hamr_loss(unit_z, cv, 3, 0.6, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().sum().item() == 0.0


def _grad(loss_fn, z):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("seed", range(3))
def test_hamr_uniform_adasid_values_and_gradients_match_the_reference(seed, dtype, tol):
    items, codes, unit, positive, z = random_batch(seed, dtype=dtype)
    cos = unit @ unit.T
    valid, _ = ref_cvpm(items, codes, cos, positive, 0.98, 1)
    cv = _cvpm(items, codes, unit, positive, 0.98, 1)
    for margin, gamma in [(0.6, 1.0), (0.9, 2.0)]:
        got = _grad(lambda v, m=margin, g=gamma: P.hamr_loss(P.unit_latent(v), cv, 3, m, g), z)
        want = _grad(lambda v, m=margin, g=gamma: ref_hamr(v, codes, valid, m, g), z)
        assert want[0] > 0
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    close = P.close_pairs(codes, 0)
    pairs = close[items[close[:, 0]] != items[close[:, 1]]]
    got = _grad(lambda v: P.uniform_loss(P.unit_latent(v), pairs, 1.2), z)
    want = _grad(lambda v: ref_uniform(v, items, codes, 0, 1.2)[0], z)
    assert want[0] > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    pairs, weights = P.adasid_pairs(items, codes, unit, unordered(positive))
    ref_w = ref_adasid(z, items, codes, cos, positive, 0.5, 1.0)[1]
    overlap = (items[:, None] != items[None, :]) & (codes[:, None, 0] == codes[None, :, 0])
    assert torch.equal(dense_of(pairs, len(items)), overlap)  # W = 0 off these pairs
    torch.testing.assert_close(weights, ref_w[pairs[:, 0], pairs[:, 1]], rtol=tol, atol=tol)
    got = _grad(lambda v: P.adasid_loss(P.unit_latent(v), pairs, weights, 0.5, 1.0), z)
    want = _grad(lambda v: ref_adasid(v, items, codes, cos, positive, 0.5, 1.0)[0], z)
    assert want[0] > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_pair_hinge_ties_at_the_margin_and_chunks(monkeypatch):
    # orthogonal unit vectors: d = sqrt(2 + ε) exactly as the reference computes it
    z = torch.eye(4, dtype=torch.float64)
    d = float(ref_distances(z)[0, 1])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 3]])
    weight = torch.ones(3, dtype=torch.float64)
    loss, grad = _grad(lambda v: P.pair_hinge(P.unit_latent(v), pairs, weight, d), z)
    assert loss.item() == 0.0 and grad.abs().sum().item() == 0.0  # on the margin: no push
    margins = torch.tensor([d + 0.1, d - 0.1, d + 0.2], dtype=torch.float64)
    whole = _grad(lambda v: P.pair_hinge(P.unit_latent(v), pairs, weight, margins), z)
    assert whole[0].item() == pytest.approx(0.1 ** 2 + 0.2 ** 2)
    monkeypatch.setattr(P, "HINGE_CHUNK", 2)  # the same sum over two chunks
    chunked = _grad(lambda v: P.pair_hinge(P.unit_latent(v), pairs, weight, margins), z)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_contrastive_allowed_matches_the_dense_mask():
    items, _, _, positive, _ = random_batch(1)
    anchor = torch.arange(9)
    allowed = P.contrastive_allowed(items, anchor, unordered(positive))
    expected = (items[anchor][:, None] != items[None, :]) & ~positive[anchor]
    assert torch.equal(allowed, expected)


# ---- the whole loss on both paths ----

@pytest.mark.parametrize("name", ["quasid", "uniform", "adasid", "adasid+hamr", "uniform-dup",
                                  "quasid-mine", "uniform-mine"])
def test_model_losses_sparse_and_dense_paths_agree(name):
    """Both paths, also on a conflict-mined batch (`-mine`: train.mine_conflicts, whose
    content-neighbour partners are live conflicts, so the repulsion has more pairs)."""
    rng = np.random.default_rng(1)
    n = 400
    content = torch.tensor(rng.normal(size=(n, 8)), dtype=torch.float32)
    # every item has a near-duplicate (cos ≈ 0.995; not identical: in fp32 d = sqrt(2 − 2g + ε)
    # of identical latents is ill-conditioned, and GEMM and row sums round g differently)
    content[n // 2:] = content[:n // 2] + 0.1 * torch.tensor(rng.normal(size=(n // 2, 8)),
                                                              dtype=torch.float32)
    extra = {"uniform_tau_dup": 0.98} if name == "uniform-dup" else {}  # near-duplicates exempt
    mine = name.endswith("-mine")
    tok = make_tokenizer(name.removesuffix("-dup").removesuffix("-mine"),
                         {"hidden": [16], "latent": 4, "codebook_size": 4, "tower_dim": 8,
                          "train": {"batch_size": 68, "mine_conflicts": mine}, **extra})
    model = tok._build(8)
    model.set_standardization(content)
    g = torch.Generator().manual_seed(0)
    hamr = tok.config.hamr
    sampler = BatchSampler(model.standardize(content), content,
                           PairIndex(rng.integers(0, n, size=(3 * n, 2)), n), 68, g,
                           neighbours=2, near_duplicate=tok.config.tau_dup if hamr else None,
                           conflicts=conflict_rule(tok.config))
    assert (sampler.rule is not None) == mine
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(sampler.x), g, 3)
    sampler.set_codes(all_codes(model, content))
    if mine:
        assert sampler.conflict.any()
    sampler.new_epoch()
    batch = sampler.batch(0)
    assert batch.positive is None and len(batch.positive_pairs) > 0  # CPU: the pair list only
    assert (batch.near_pairs is not None and len(batch.near_pairs) > 0) == hamr
    # dense; sparse with the sampler's near-duplicate list; sparse with the scan
    runs = [(False, batch), (True, batch), (True, dataclasses.replace(batch, near_pairs=None))]
    out = []
    for sparse, b in runs:
        model.sparse_pairs = sparse
        model.zero_grad()
        total, terms = model.losses(b, 0.3)
        total.backward()
        out.append((terms, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (dense, dense_grads) = out[0]
    for sparse, sparse_grads in out[1:]:
        assert dense.keys() == sparse.keys()
        for key in dense:
            if dense[key].is_floating_point():
                torch.testing.assert_close(sparse[key], dense[key], rtol=1e-5, atol=1e-6)
            else:  # pair counts: exact
                assert torch.equal(sparse[key], dense[key]), key
        for a, b in zip(sparse_grads, dense_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

"""Each loss and mask against a small hand-computed example (exact numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from quasid.tokenizer import losses as L
from quasid.tokenizer.encoder import Encoder


def test_reconstruction_loss_is_mean_squared_norm():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # ‖(0, -2)‖² = 4, ‖(1, 1)‖² = 2 -> mean 3
    assert L.reconstruction_loss(x_hat, x).item() == pytest.approx(3.0)


def test_rq_loss_codebook_and_commitment_terms_and_their_gradients():
    r1 = torch.tensor([[2.0, 0.0]], requires_grad=True)
    e1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    r2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    e2 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = L.rq_loss([r1, r2], [e1, e2], beta=0.25)
    # each level: ‖r − e‖² = 1 -> 1 (codebook) + 0.25 (commitment); two levels
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    # commitment reaches r only: 2β(r − e); the codebook term reaches e only: 2(e − r)
    assert r1.grad[0].tolist() == pytest.approx([0.5, 0.0])
    assert e1.grad[0].tolist() == pytest.approx([-2.0, 0.0])
    assert e2.grad[0].tolist() == pytest.approx([0.0, 2.0])
    ema = L.rq_loss([r1, r2], [e1, e2], beta=0.25, codebook_term=False)
    assert ema.item() == pytest.approx(0.5)


def test_hamming_and_shared_prefix():
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 5, 2], [4, 5, 6]])
    assert L.hamming(codes).tolist() == [[0, 1, 1, 3], [1, 0, 2, 3], [1, 2, 0, 2], [3, 3, 2, 0]]
    assert L.shared_prefix(codes).tolist() == [[3, 2, 1, 0], [2, 3, 1, 0], [1, 1, 3, 0],
                                               [0, 0, 0, 3]]


def _cvpm_batch():
    # rows 0..4; items 10 and 10 are the same item twice; 11-12 are collaborative positives
    items = torch.tensor([10, 11, 10, 12, 13])
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 2], [1, 1, 1]])
    cos = torch.full((5, 5), 0.5)
    cos.fill_diagonal_(1.0)
    cos[0, 2] = cos[2, 0] = 1.0  # the same item
    cos[0, 4] = cos[4, 0] = 0.99  # near-duplicate content
    positive = torch.zeros((5, 5), dtype=torch.bool)
    positive[1, 3] = positive[3, 1] = True
    return items, codes, cos, positive


def test_cvpm_mask_excludes_each_reason_and_counts_them():
    items, codes, cos, positive = _cvpm_batch()
    result = L.cvpm_mask(items, L.hamming(codes), cos, positive, tau_dup=0.98, h_max=2)
    # H: 0-4, 2-4, 3-4 differ in 3 levels (> h_max); 0-4 is first a near-duplicate
    valid = {(0, 1), (0, 3), (1, 2), (1, 4), (2, 3)}
    expected = [[(min(i, j), max(i, j)) in valid for j in range(5)] for i in range(5)]
    assert result.mask.tolist() == expected
    assert result.counts() == {"self": 5, "same_item": 2, "collaborative": 2,
                               "near_duplicate": 2, "far": 4}
    assert sum(result.counts().values()) + int(result.mask.sum()) == 25


def test_cvpm_threshold_and_h_max_are_inclusive_limits():
    items, codes, cos, positive = _cvpm_batch()
    loose = L.cvpm_mask(items, L.hamming(codes), cos, positive, tau_dup=0.995, h_max=3)
    # 0-4 (cos 0.99 ≤ 0.995, H = 3 ≤ 3) and 2-4, 3-4 become valid
    assert loose.counts() == {"self": 5, "same_item": 2, "collaborative": 2,
                              "near_duplicate": 0, "far": 0}
    assert bool(loose.mask[0, 4]) and bool(loose.mask[3, 4])


# Three unit latents: z0 = (1,0,0), z1 = (0.8,0,0.6), z2 = (0.8,0.6,0):
# cos01 = cos02 = 0.8 -> d = sqrt(0.4); cos12 = 0.64 -> d = sqrt(0.72).
Z = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.0, 0.6], [0.8, 0.6, 0.0]])
CODES = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0]])  # H01 = 1, H02 = 0, H12 = 1


def test_hamr_loss_hand_computed():
    mask = ~torch.eye(3, dtype=torch.bool)
    loss = L.hamr_loss(2.0 * Z, L.hamming(CODES), 3, mask, margin=0.5, gamma=1.0)
    # pair 02: s = 1, m = 1.0, w = 1; pair 01: s = 2/3, m = 0.5·(5/3), w = 2/3;
    # pair 12: s = 2/3, d = sqrt(0.72) = 0.8485 > 0.8333: no push. Both orders, B = 3 rows.
    d = math.sqrt(0.4)
    expected = 2 * ((1.0 - d) ** 2 + (2 / 3) * (0.5 * (1 + 2 / 3) - d) ** 2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.1079934, rel=1e-5)


def test_hamr_gamma_scales_partial_overlaps_only():
    mask = ~torch.eye(3, dtype=torch.bool)
    ham = L.hamming(CODES)
    d = math.sqrt(0.4)
    loss = L.hamr_loss(Z, ham, 3, mask, margin=0.5, gamma=2.0)
    expected = 2 * ((1.0 - d) ** 2 + (2 / 3) ** 2 * (0.5 * (1 + 2 / 3) - d) ** 2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_uniform_repulsion_hand_computed():
    mask = ~torch.eye(3, dtype=torch.bool)
    loss = L.uniform_repulsion_loss(Z, mask, margin=1.0)
    expected = 2 * (2 * (1 - math.sqrt(0.4)) ** 2 + (1 - math.sqrt(0.72)) ** 2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.1954144, rel=1e-5)


def test_info_nce_hand_computed():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    anchor, target = torch.tensor([0, 2]), torch.tensor([1, 0])
    allowed = torch.tensor([[False, True, True], [True, True, False]])
    # pair 0: logits over {1, 2} = (0, 0) -> log 2; pair 1: over {0, 1} = (1, 0) -> log(1 + e^-1)
    both = L.info_nce(f, g, anchor, target, allowed, torch.tensor([1.0, 1.0]), tau=1.0)
    assert both.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-1))) / 2)
    first = L.info_nce(f, g, anchor, target, allowed, torch.tensor([1.0, 0.0]), tau=1.0)
    assert first.item() == pytest.approx(math.log(2))
    sharp = L.info_nce(f, g, anchor, target, allowed, torch.tensor([0.0, 1.0]), tau=0.5)
    assert sharp.item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_info_nce_target_always_counts_even_if_masked():
    f = torch.eye(2)
    loss = L.info_nce(f, f, torch.tensor([0]), torch.tensor([1]),
                      torch.zeros((1, 2), dtype=torch.bool), torch.tensor([1.0]), tau=1.0)
    assert loss.item() == pytest.approx(0.0)


def test_adasid_weights_hand_computed():
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 5, 2], [7, 7, 7]])
    cos = torch.zeros((4, 4))
    cos[0, 1] = cos[1, 0] = 0.9
    cos[0, 2] = cos[2, 0] = 0.2
    cos[1, 2] = cos[2, 1] = -0.5
    positive = torch.zeros((4, 4), dtype=torch.bool)
    distinct = ~torch.eye(4, dtype=torch.bool)
    w = L.adasid_weights(codes, cos, positive, distinct)
    # prefixes p01 = 2 (2 of 4 rows share it), p02 = p12 = 1 (3 of 4 rows); row 3 shares none
    assert w[0, 1].item() == pytest.approx((1 - 0.9) * 2 / 4)
    assert w[0, 2].item() == pytest.approx((1 - 0.2) * 3 / 4)
    assert w[1, 2].item() == pytest.approx(1.0 * 3 / 4)
    assert torch.equal(w, w.T)
    assert w[3].abs().sum().item() == 0 and w.diagonal().abs().sum().item() == 0
    positive[0, 2] = positive[2, 0] = True
    assert L.adasid_weights(codes, cos, positive, distinct)[0, 2].item() == 0.0


def test_adasid_schedule_and_loss():
    assert L.adasid_schedule(0.0, 0.1) == pytest.approx(1.0)
    assert L.adasid_schedule(0.5, 0.1) == pytest.approx(0.55)
    assert L.adasid_schedule(1.0, 0.1) == pytest.approx(0.1)
    assert L.adasid_schedule(torch.tensor(0.5), 0.1).item() == pytest.approx(0.55)
    weights = torch.zeros((3, 3))
    weights[0, 2] = weights[2, 0] = 0.6
    weights[1, 2] = weights[2, 1] = 0.2
    loss = L.adasid_loss(Z, weights, rho=0.5, margin=1.0)
    # W-weighted mean of the squared hinge: (0.6 (1 − √0.4)² + 0.2 (1 − √0.72)²) / 0.8, × ρ
    expected = 0.5 * (0.6 * (1 - math.sqrt(0.4)) ** 2 + 0.2 * (1 - math.sqrt(0.72)) ** 2) / 0.8
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_hamr_gradient_reaches_encoder_only_for_valid_low_hamming_pairs():
    torch.manual_seed(0)
    encoder = Encoder(6, hidden=(8,), latent=4)
    x = torch.randn(6, 6, requires_grad=True)
    items = torch.arange(6)
    # 0-1 collide (valid); 2-3 collide but are collaborative positives; 4 shares no level
    # with anyone (H = 3 > h_max); 5 collides with 0 and 1 but is their near-duplicate.
    codes = torch.tensor([[0, 0, 0], [0, 0, 0], [5, 5, 5], [5, 5, 5], [9, 9, 9], [0, 0, 0]])
    cos = torch.zeros((6, 6))
    cos[5, :2] = cos[:2, 5] = 0.99
    positive = torch.zeros((6, 6), dtype=torch.bool)
    positive[2, 3] = positive[3, 2] = True
    ham = L.hamming(codes)
    cv = L.cvpm_mask(items, ham, cos, positive, tau_dup=0.98, h_max=2)
    assert cv.mask.nonzero().tolist() == [[0, 1], [1, 0]]
    # a margin wider than any unit distance, so every valid pair is inside it
    loss = L.hamr_loss(encoder(x), ham, 3, cv.mask, margin=1.5)
    loss.backward()
    row_grad = x.grad.abs().sum(dim=1)
    assert (row_grad[:2] > 0).all()
    assert (row_grad[2:] == 0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())

    # the same pair, now collaborative positives: nothing is pushed
    x.grad = None
    positive[0, 1] = positive[1, 0] = True
    cv = L.cvpm_mask(items, ham, cos, positive, tau_dup=0.98, h_max=2)
    L.hamr_loss(encoder(x), ham, 3, cv.mask, margin=1.5).backward()
    assert x.grad.abs().sum().item() == 0

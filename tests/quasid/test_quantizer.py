"""Residual quantizer: k-means, residual coding, straight-through gradients, EMA, dead codes."""

from __future__ import annotations

import pytest
import torch

from quasid.tokenizer.losses import rq_loss
from quasid.tokenizer.quantizer import ResidualQuantizer, cluster_sums, kmeans, nearest
from tests.quasid.sid_testing import torch_threads


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centers.repeat_interleave(50, dim=0) + 0.1 * torch.randn(150, 2, generator=g)
    return x, centers


def test_kmeans_finds_separated_blobs_and_is_seeded():
    x, centers = _blobs()
    got = kmeans(x, 3, iters=10, generator=torch.Generator().manual_seed(1))
    order = torch.argsort(got[:, 0] * 100 + got[:, 1])
    expected = centers[torch.argsort(centers[:, 0] * 100 + centers[:, 1])]
    assert torch.allclose(got[order], expected, atol=0.05)
    again = kmeans(x, 3, iters=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, again)


def test_kmeans_with_fewer_points_than_codes_keeps_all_points():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert got.shape == (4, 2)
    assert torch.equal(got[:2], x)


def _hand_quantizer() -> ResidualQuantizer:
    q = ResidualQuantizer(levels=2, codebook_size=2, dim=2, beta=0.25)
    with torch.no_grad():
        q.codebooks[0] = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
        q.codebooks[1] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    return q


def test_residual_coding_by_hand():
    q = _hand_quantizer().eval()
    z = torch.tensor([[10.1, 0.9], [0.2, -0.1]])
    out = q(z)
    # level 0 picks (10, 0); the residual (0.1, 0.9) then picks (0, 1)
    assert out.codes.tolist() == [[1, 1], [0, 0]]
    assert torch.allclose(out.quantized, torch.tensor([[10.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(q.codes(z), out.codes)
    expected = rq_loss(out.residuals, out.codewords, beta=0.25)
    assert out.loss.item() == pytest.approx(expected.item())
    # ‖r − e‖²: row 0: 0.82 (level 0) + 0.02 (level 1); row 1: 0.05 + 0.05; (1 + β) × means
    assert out.loss.item() == pytest.approx(1.25 * ((0.82 + 0.05) / 2 + (0.02 + 0.05) / 2))


def test_straight_through_gradient_is_identity_on_z():
    q = _hand_quantizer()
    z = torch.tensor([[10.1, 0.9], [0.2, -0.1]], requires_grad=True)
    (q(z).quantized * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert z.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_nearest_uses_squared_euclidean():
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert nearest(torch.tensor([[1.4, 5.0], [1.6, -5.0]]), c).tolist() == [0, 1]


def test_init_kmeans_levels_fit_their_residuals():
    x, _ = _blobs()
    q = ResidualQuantizer(levels=2, codebook_size=3, dim=2)
    q.init_kmeans(x, torch.Generator().manual_seed(0), iters=10)
    first = q.codes(x)[:, 0]
    # each blob gets its own level-0 code; level 1 then codes the small within-blob residuals
    assert len(set(first[:50].tolist())) == 1 and len(set(first.tolist())) == 3
    assert q.codebooks[1].abs().max() < 0.5


def test_dead_codes_are_reseeded_onto_batch_residuals():
    x, _ = _blobs()
    q = ResidualQuantizer(levels=1, codebook_size=4, dim=2)
    with torch.no_grad():
        q.codebooks[0] = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [99.0, 99.0]])
    q.train()
    q(x)
    assert q.usage[0].tolist() == [50.0, 50.0, 50.0, 0.0]
    reseeded = q.reseed_dead(torch.Generator().manual_seed(0))
    assert reseeded == [1]
    new = q.codebooks[0, 3]
    assert torch.cdist(new[None], x).min() < 0.5  # moved next to a data point
    assert q.usage.sum().item() == 0
    assert q.codebooks[0, :3].tolist() == [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]


def test_ema_codebooks_move_to_the_mean_of_their_residuals():
    x, centers = _blobs()
    q = ResidualQuantizer(levels=1, codebook_size=3, dim=2, ema=True, decay=0.0)
    assert not q.codebooks.requires_grad
    with torch.no_grad():
        q.codebooks[0] = centers + 1.0  # off by one, but still nearest to its own blob
    q.train()
    out = q(x)
    means = torch.stack([x[:50].mean(0), x[50:100].mean(0), x[100:].mean(0)])
    assert torch.allclose(q.codebooks[0], means, atol=1e-4)
    # EMA codebooks learn no gradient: only the commitment term is in the loss
    assert out.loss.item() == pytest.approx(
        0.25 * (x - (centers + 1.0).repeat_interleave(50, 0)).pow(2).sum(1).mean().item(), rel=1e-5)


def test_codebook_gradient_is_bit_identical_on_two_threads():
    """A training batch's codebook gradient repeats bit for bit with 2 CPU threads.

    With `book[idx]` it did not: the accumulating index backward sums the rows of a code
    used many times in a thread-dependent order, so fresh CPU fits drifted apart.
    """
    with torch_threads(2):
        g = torch.Generator().manual_seed(0)
        q = ResidualQuantizer(levels=3, codebook_size=256, dim=32)
        z = torch.randn(1024, 32, generator=g)
        upstream = torch.randn(1024, 32, generator=g)
        grads = []
        for _ in range(5):
            q.codebooks.grad = None
            out = q(z)
            (out.loss + sum((e * upstream).sum() for e in out.codewords)).backward()
            grads.append(q.codebooks.grad.clone())
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_cluster_sums_by_hand_with_an_empty_cluster():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [0.5, 0.25]])
    assign = torch.tensor([2, 0, 2, 0, 1])
    sums, sizes = cluster_sums(x, assign, 4)
    assert sums.tolist() == [[10.0, 12.0], [0.5, 0.25], [6.0, 8.0], [0.0, 0.0]]
    assert sizes.tolist() == [2, 1, 2, 0]

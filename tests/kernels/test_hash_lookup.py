"""MemoryFormer hash lookup: the fast path (codes + scores + weighted embedding bag) against
the dense one-hot reference, forward, table gradients and input gradients through the score;
fp64 gradcheck with inputs kept away from the sign boundary."""

from __future__ import annotations

import itertools

import pytest
import torch

from neotron.kernels.hash_lookup import (
    hash_codes,
    hash_lookup,
    hash_lookup_reference,
    hash_scores,
)

F64 = torch.float64


def away_from_zero(shape, seed=0, margin=0.1, dtype=F64):
    """Random entries with |z| >= margin: a finite-difference step cannot flip a sign."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen, dtype=dtype)
    return (z.sign() * (z.abs() + margin)).requires_grad_()


def tables(K, tau, d_out, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, 2**tau, d_out, generator=gen, dtype=dtype).requires_grad_()


def test_codes_are_sign_bits_msb_first():
    z = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])  # bits 1 0 1 1 (0 counts as >= 0)
    assert hash_codes(z).item() == 0b1011
    assert hash_codes(-torch.ones(1, 2, 3)).tolist() == [[0, 0]]
    assert hash_codes(torch.ones(1, 1, 8)).item() == 255


def test_paper_score_is_the_probability_of_the_sign_code():
    """p = exp(<z, sign z>) / sum over all 2^tau sign vectors c of exp(<z, c>)."""
    tau = 4
    z = away_from_zero((3, 2, tau))
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=tau)), dtype=F64)
    logits = torch.einsum("nkt,ct->nkc", z.detach(), signs)
    best = torch.einsum("nkt,nkt->nk", z.detach(), z.detach().sign())
    prob = (best - logits.logsumexp(-1)).exp()
    torch.testing.assert_close(hash_scores(z, "paper"), prob, rtol=1e-12, atol=1e-14)
    l1 = z.detach().abs().sum(-1)
    torch.testing.assert_close(hash_scores(z, "l1"), l1 * prob, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("score", ["l1", "paper"])
@pytest.mark.parametrize("K,tau,d_out,N", [(3, 4, 5, 17), (2, 8, 16, 40), (5, 1, 3, 9)])
def test_fast_matches_one_hot_reference(score, K, tau, d_out, N):
    z = away_from_zero((N, K * tau))
    t = tables(K, tau, d_out)
    out = hash_lookup(z, t, score=score, impl="fast")
    ref = hash_lookup_reference(z, t, score)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    g_fast = torch.autograd.grad(out, [z, t], g)
    g_ref = torch.autograd.grad(ref, [z, t], g)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    # the tables get gradient only in the rows that were read
    read = torch.zeros(K, 2**tau, dtype=torch.bool)
    codes = hash_codes(z.detach().view(N, K, tau))
    read[torch.arange(K).expand(N, K), codes] = True
    assert (g_fast[1][~read] == 0).all()


@pytest.mark.parametrize("score", ["l1", "paper"])
def test_gradcheck_fp64(score):
    z = away_from_zero((3, 2 * 3), seed=3)
    t = tables(2, 3, 4, seed=4)
    assert torch.autograd.gradcheck(lambda zz, tt: hash_lookup(zz, tt, score=score), (z, t))
    assert torch.autograd.gradcheck(
        lambda zz, tt: hash_lookup_reference(zz, tt, score), (z, t))


def test_score_gradient_follows_the_formula():
    """d p / d z_j = p * 2 sigmoid(-2|z_j|) sign(z_j) for the paper score."""
    z = away_from_zero((1, 1, 5), seed=5)
    p = hash_scores(z, "paper")
    (g,) = torch.autograd.grad(p.sum(), [z])
    zz = z.detach()
    expected = p.detach()[..., None] * 2 * torch.sigmoid(-2 * zz.abs()) * zz.sign()
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert 2.0**-5 < p.item() <= 1  # each factor sigmoid(2|z_j|) lies in [1/2, 1]


def test_shape_errors():
    with pytest.raises(ValueError, match="K \\* tau"):
        hash_lookup(torch.randn(2, 10), torch.randn(3, 8, 4))

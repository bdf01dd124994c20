"""Weighted embedding bag: the fast path (fused forward, own backward) against
torch.nn.functional.embedding_bag, forward and backward, and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import neotron.kernels.embedding_bag.fast as fast_mod
from neotron.kernels.embedding_bag import embedding_bag, embedding_bag_reference

F64, F32 = torch.float64, torch.float32


def inputs(R=50, D=7, N=13, L=6, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(R, D, generator=gen, dtype=dtype).requires_grad_()
    idx = torch.randint(0, R, (N, L), generator=gen)
    idx[0, :3] = 5  # the same row several times in one bag
    idx[1, 0] = idx[2, 0] = 5  # and across bags
    w = torch.randn(N, L, generator=gen, dtype=dtype).requires_grad_()
    return table, idx, w


def grads(out, table, w, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [table, w], g)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("chunk", [None, 8])  # 8: the gathering path, one token per chunk
def test_fast_matches_torch_embedding_bag(dtype, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(fast_mod, "CHUNK_ELEMS", chunk)
        monkeypatch.setattr(fast_mod, "_fused_weights_grad", lambda *a: None)
    table, idx, w = inputs(dtype=dtype)
    out = embedding_bag(table, idx, w, impl="fast")
    ref = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads(out, table, w), grads(ref, table, w)):
        torch.testing.assert_close(a, b, **tol)


def test_fused_and_gathered_weight_gradients_agree():
    table, idx, w = inputs()
    g = torch.randn(idx.shape[0], table.shape[1], dtype=F64)
    fused = fast_mod._fused_weights_grad(table.detach(), idx, g)
    assert fused is not None  # available in the torch we ship with
    torch.testing.assert_close(fused, fast_mod._gathered_weights_grad(table.detach(), idx, g),
                               rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_embedding_bag():
    table, idx, w = inputs()
    out = embedding_bag_reference(table, idx, w)
    ref = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out, table, w), grads(ref, table, w)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64():
    table, idx, w = inputs(R=9, D=3, N=4, L=3)
    assert torch.autograd.gradcheck(lambda t, ww: embedding_bag(t, idx, ww, impl="fast"),
                                    (table, w))


def test_sparse_grad_holds_only_rows_read():
    table, idx, w = inputs()
    out = embedding_bag(table, idx, w, sparse_grad=True)
    (g_table,) = torch.autograd.grad(out.square().sum(), [table])
    assert g_table.is_sparse and g_table.shape == table.shape
    assert g_table._nnz() == idx.unique().numel()  # one row per distinct slot, no more
    ref = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    (g_ref,) = torch.autograd.grad(ref.square().sum(), [table])
    torch.testing.assert_close(g_table.to_dense(), g_ref, rtol=1e-12, atol=1e-12)


def test_rows_not_read_get_exact_zero_and_dtype_is_kept():
    table, idx, w = inputs(dtype=F32)
    out = embedding_bag(table, idx, w)
    assert out.dtype == F32
    (g,) = torch.autograd.grad(out.sum(), [table])
    unread = torch.ones(table.shape[0], dtype=torch.bool)
    unread[idx.unique()] = False
    assert unread.any() and (g[unread] == 0).all()


def test_bad_impl_is_rejected():
    table, idx, w = inputs()
    with pytest.raises(ValueError, match="impl"):
        embedding_bag(table, idx, w, impl="triton")

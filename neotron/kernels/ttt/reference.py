"""Primal-form, autograd-based reference for TTT-Linear and TTT-MLP (the oracle).

Follows Sun et al., arXiv 2407.04620, Sec. 2.4 ("mini-batch TTT") literally:

    for each mini-batch with starting weights theta_0:
        g_j     = grad_theta l(theta_0; x_j)            (torch.autograd.grad, one per token)
        theta_i = theta_0 - sum_{j <= i} eta_ij g_j     (every weight: W and b, or W1 b1 W2 b2)
        z_i     = f(q_i; theta_i) = q_i + LN(g(q_i; theta_i))
    the next mini-batch starts from theta_b (the last token's weights).

Nothing here uses the dual-form identities or the closed-form LayerNorm gradient of
``dual.py``: the LayerNorm is ``torch.nn.functional.layer_norm``, the inner gradients come from
autograd with ``create_graph=True`` (so outer gradients flow through them), and every token's
weights are materialized. It is slow and memory-hungry on purpose; use it for tests only.

Shapes and the meaning of ``eta`` are those of :mod:`neotron.kernels.ttt.dual`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from neotron.kernels.ttt.dual import (
    LinearState,
    MLPState,
    check_inputs,
    compute_dtype,
    initial_states,
    minibatch_bounds,
)

__all__ = ["ttt_linear_reference", "ttt_mlp_reference"]

# g(x; params) for one token per weight copy: x [B, H, m, 1, d], params per token.
InnerFn = Callable[[Tensor, list[Tensor]], Tensor]


def _ln(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Per-head LayerNorm; z: [B, H, ..., d], weight/bias: [H, d]."""
    shape = (weight.shape[0],) + (1,) * (z.dim() - 3) + (weight.shape[1],)
    return F.layer_norm(z, z.shape[-1:], eps=eps) * weight.view(shape) + bias.view(shape)


def _primal(
    inner: InnerFn,
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    params: list[Tensor],
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    eps: float,
) -> tuple[Tensor, list[Tensor]]:
    """The mini-batch TTT loop for any inner model ``g`` (inputs already in compute dtype,
    params per batch element: [B, H, r, c])."""
    B, H, T, d = xq.shape
    # The inner gradients need autograd even when the caller runs under no_grad; they only
    # become part of the outer graph (create_graph) when the caller is recording one.
    outer = torch.is_grad_enabled()
    outs = []
    for n, (s, e) in enumerate(minibatch_bounds(T, mini_batch_size)):
        m = e - s
        q, k, v = (x[:, :, s:e].unsqueeze(-2) for x in (xq, xk, xv))  # [B, H, m, 1, d]
        eta_mb = torch.tril(eta[:, :, n, :m, :m])  # only j <= i contributes
        with torch.enable_grad():
            # One copy of theta_0 per token: l(theta_0; x_j) only touches copy j, so a single
            # autograd.grad of the summed loss w.r.t. the copies returns every per-token
            # gradient g_j = grad l(theta_0; x_j) (the usual per-sample-gradient trick).
            copies = [p.unsqueeze(2).expand(B, H, m, *p.shape[2:]) for p in params]
            copies = [c if c.requires_grad else c.detach().requires_grad_() for c in copies]
            pred = _ln(inner(k, copies), ln_weight, ln_bias, eps)
            loss = 0.5 * (pred - (v - k)).pow(2).sum()
            grads = torch.autograd.grad(loss, copies, create_graph=outer)
        # theta_i = theta_0 - sum_{j<=i} eta_ij g_j, for every token i of the mini-batch.
        thetas = [
            p.unsqueeze(2) - torch.einsum("bhij,bhjrc->bhirc", eta_mb, g)
            for p, g in zip(params, grads)
        ]
        outs.append((q + _ln(inner(q, thetas), ln_weight, ln_bias, eps)).squeeze(-2))
        params = [t[:, :, -1] for t in thetas]
    z = torch.cat(outs, dim=2) if outs else xq
    return z, params


def _linear_inner(x: Tensor, p: list[Tensor]) -> Tensor:
    W, b = p
    return x @ W + b


def _mlp_inner(x: Tensor, p: list[Tensor]) -> Tensor:
    W1, b1, W2, b2 = p
    return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2


def ttt_linear_reference(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    W0: Tensor,
    b0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    mini_batch_size: int = 16,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearState | None]:
    """TTT-Linear, primal form with autograd. Same contract as ``ttt_linear``."""
    check_inputs(xq, xk, xv, eta, ln_weight, ln_bias, mini_batch_size)
    B, H, T, d = xq.shape
    cdt = compute_dtype(xq)
    params = initial_states((W0, b0), ((d, d), (1, d)), initial_state, B, H, cdt)
    z, params = _primal(
        _linear_inner, xq.to(cdt), xk.to(cdt), xv.to(cdt),
        eta.to(cdt).expand(B, H, -1, -1, -1), params,
        ln_weight.to(cdt), ln_bias.to(cdt), mini_batch_size, eps,
    )  # fmt: skip
    return z.to(xq.dtype), ((params[0], params[1]) if output_final_state else None)


def ttt_mlp_reference(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    mini_batch_size: int = 16,
    initial_state: MLPState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, MLPState | None]:
    """TTT-MLP, primal form with autograd. Same contract as ``ttt_mlp``."""
    check_inputs(xq, xk, xv, eta, ln_weight, ln_bias, mini_batch_size)
    B, H, T, d = xq.shape
    hidden = W1.shape[-1]
    cdt = compute_dtype(xq)
    params = initial_states(
        (W1, b1, W2, b2), ((d, hidden), (1, hidden), (hidden, d), (1, d)), initial_state, B, H, cdt
    )
    z, params = _primal(
        _mlp_inner, xq.to(cdt), xk.to(cdt), xv.to(cdt),
        eta.to(cdt).expand(B, H, -1, -1, -1), params,
        ln_weight.to(cdt), ln_bias.to(cdt), mini_batch_size, eps,
    )  # fmt: skip
    final = (params[0], params[1], params[2], params[3]) if output_final_state else None
    return z.to(xq.dtype), final

"""TTT-Linear and TTT-MLP inner loops, mini-batch dual form (the fast CPU/GPU path).

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
arXiv 2407.04620, Sec. 2.4-2.5 (mini-batch TTT and the dual form) and Appendix A.

Layout: every per-token tensor is ``[batch, heads, time, head_dim]`` ("B H T d"). The inner
model of each head is ``f(x; theta) = x + LN(g(x; theta))`` with ``g`` linear (TTT-Linear) or a
two-layer GELU(tanh) MLP (TTT-MLP), a per-head LayerNorm, and the self-supervised inner loss
``l(theta; x_t) = 1/2 || LN(g(k_t; theta)) - (v_t - k_t) ||^2`` (the target is ``v - k`` because
of the residual in ``f``).

Mini-batch TTT: the sequence is cut into mini-batches of ``b`` tokens. Inside one mini-batch
every token's gradient is taken at the mini-batch's starting weights ``theta_0`` and token ``i``
sees ``theta_i = theta_0 - sum_{j<=i} eta_ij grad l(theta_0; x_j)``. Because all gradients are
taken at the same point, they are available in closed form for the whole mini-batch at once and
the ``theta_i`` never need to be materialized (the "dual form"):

    Z     = K W_0 + b_0                       (the inner forward on the keys)
    G     = dl/dZ                             (closed form, fused LayerNorm + L2 backward)
    Zbar  = Q W_0 - (eta * tril(Q K^T)) G + b_0 - tril(eta) G
    W_b   = W_0 - (eta_last * K)^T G,  b_b = b_0 - sum_j eta_last,j G_j

where ``eta_last`` is the last row of the mini-batch's eta (the weights the next mini-batch
starts from). TTT-MLP applies the same identity to each of its two layers (Appendix A), with
the layer-1 gradient obtained by back-propagating G through ``W2`` and ``gelu'``.

The functions here are plain differentiable PyTorch: the outer gradients (w.r.t. q, k, v, eta,
the initial weights and the LN parameters) come from autograd. ``reference.py`` is the primal
(per-token ``torch.autograd.grad``) oracle that these are tested against.

The learning-rate tensor ``eta`` (see :func:`ttt_eta` for building it from the official
factorization ``eta_ij = token_eta_i * lr_eta_j``):

    eta: [B | 1, H | 1, N, b, b], N = ceil(T / b)
    eta[..., n, i, j] = learning rate applied to the gradient of token ``n*b + j`` in the weights
    used by token ``n*b + i``. Only the lower triangle (j <= i, diagonal included) is read. If T is
    not a multiple of b the last mini-batch has r = T - (N-1) b tokens and only
    ``eta[..., N-1, :r, :r]`` is read (it goes through the same math: the dual form is exact for
    a shorter mini-batch because ``tril`` already restricts every sum to j <= i).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gelu_tanh",
    "gelu_tanh_grad",
    "layer_norm_l2_grad",
    "ttt_eta",
    "ttt_linear_dual",
    "ttt_mlp_dual",
]

LinearState = tuple[Tensor, Tensor]
MLPState = tuple[Tensor, Tensor, Tensor, Tensor]

# sqrt(2 / pi) and the cubic coefficient of the tanh approximation of GELU, as used by
# torch.nn.functional.gelu(approximate="tanh").
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


# ----------------------------------------------------------------------------- plumbing


def compute_dtype(x: Tensor) -> torch.dtype:
    """The inner loop runs in fp32 (the JAX training scripts do too; bf16 inner updates drift),
    or fp64 when the inputs are fp64 (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def minibatch_bounds(seq_len: int, mini_batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each mini-batch; the last one is shorter when T % b != 0."""
    return [(s, min(s + mini_batch_size, seq_len)) for s in range(0, seq_len, mini_batch_size)]


def check_inputs(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
) -> None:
    """Shape checks shared by the dual form and the reference, with messages that name the
    argument (a silent broadcast here would train a wrong model)."""
    if xq.dim() != 4:
        raise ValueError(f"xq must be [batch, heads, time, head_dim], got shape {tuple(xq.shape)}")
    if xk.shape != xq.shape or xv.shape != xq.shape:
        raise ValueError(
            f"xq, xk, xv must have the same shape, got {tuple(xq.shape)}, {tuple(xk.shape)}, "
            f"{tuple(xv.shape)}"
        )
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    B, H, T, d = xq.shape
    n = -(-T // mini_batch_size)
    if (
        eta.dim() != 5
        or eta.shape[2:] != (n, mini_batch_size, mini_batch_size)
        or eta.shape[0] not in (1, B)
        or eta.shape[1] not in (1, H)
    ):
        raise ValueError(
            f"eta must be [batch|1, heads|1, n_minibatches, b, b] = [{B}|1, {H}|1, {n}, "
            f"{mini_batch_size}, {mini_batch_size}], got {tuple(eta.shape)}"
        )
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p.shape != (H, d):
            raise ValueError(f"{name} must be [heads, head_dim] = [{H}, {d}], got {tuple(p.shape)}")


def initial_states(
    params: tuple[Tensor, ...],
    shapes: tuple[tuple[int, int], ...],
    initial_state: tuple[Tensor, ...] | None,
    batch: int,
    heads: int,
    dtype: torch.dtype,
) -> list[Tensor]:
    """The per-batch-element inner weights to start from.

    ``params`` are the layer's learnable initial weights, ``[heads, r, c]`` (shared by every
    sequence of the batch) or ``[batch, heads, r, c]``. ``initial_state``, when given, replaces
    them (e.g. continuing a sequence from a previous call's final state) and must be
    ``[batch, heads, r, c]``.
    """
    src = params if initial_state is None else tuple(initial_state)
    if len(src) != len(shapes):
        raise ValueError(f"expected {len(shapes)} state tensors, got {len(src)}")
    out = []
    for i, (p, (r, c)) in enumerate(zip(src, shapes)):
        ok_shapes = [(batch, heads, r, c)] + ([(heads, r, c)] if initial_state is None else [])
        if tuple(p.shape) not in ok_shapes:
            what = "initial_state" if initial_state is not None else "initial weight"
            raise ValueError(
                f"{what} #{i} must have shape {' or '.join(map(str, ok_shapes))}, "
                f"got {tuple(p.shape)}"
            )
        out.append(p.to(dtype).expand(batch, heads, r, c))
    return out


def ttt_eta(token_eta: Tensor, lr_eta: Tensor, mini_batch_size: int) -> Tensor:
    """Build the kernels' ``eta`` from the official factorization (Sun et al. Sec. 3.3 / the
    reference code's ``get_eta``): ``eta[n, i, j] = token_eta[i] * lr_eta[n*b + j]``.

    Args:
        token_eta: ``[b]`` or ``[heads, b]``: the per-position scale inside a mini-batch, in the
            official parameterization ``clamp_min(1 / (i + 1) + learnable_offset_i, 0)`` for
            i = 0..b-1 (the layer computes and clamps it).
        lr_eta: ``[batch, heads, T]``: the per-token learning rate,
            ``ttt_base_lr * sigmoid(theta_lr . x_t + b_lr) / head_dim`` (computed by the layer).
        mini_batch_size: b.

    Returns:
        ``[batch, heads, ceil(T / b), b, b]``; columns past the end of the sequence are zero.
        Position i of a mini-batch always uses ``token_eta[i]``, including in the shorter last
        mini-batch, so a sequence split at a mini-batch boundary sees the same rates.
    """
    b = mini_batch_size
    if lr_eta.dim() != 3:
        raise ValueError(f"lr_eta must be [batch, heads, time], got {tuple(lr_eta.shape)}")
    if token_eta.shape[-1] != b or token_eta.dim() not in (1, 2):
        raise ValueError(f"token_eta must be [b] or [heads, b] with b={b}, got {token_eta.shape}")
    B, H, T = lr_eta.shape
    n = -(-T // b)
    lr = torch.nn.functional.pad(lr_eta, (0, n * b - T)).reshape(B, H, n, 1, b)
    tok = token_eta.reshape(1, -1, 1, b, 1)
    return tok * lr


# --------------------------------------------------------------------------- inner math


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim with per-head affine parameters (broadcast by the caller)."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(var + eps) * weight + bias


def layer_norm_l2_grad(
    z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """d/dz of 1/2 || LN(z) - target ||^2 in closed form (fused LN backward).

    With xhat = (z - mu) / sigma, sigma = sqrt(var + eps) and gxhat = (LN(z) - target) * gamma,
    the LayerNorm backward is
        dz = (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) / sigma
    (the two means remove the components along the directions that centering and scaling
    project out). Written out rather than taken from autograd because the inner gradient is
    part of the forward pass: autograd then differentiates *this* expression for the outer
    gradients.
    """
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = zc * rstd
    gxhat = (xhat * weight + bias - target) * weight
    return rstd * (
        gxhat - gxhat.mean(-1, keepdim=True) - xhat * (gxhat * xhat).mean(-1, keepdim=True)
    )


def gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """d/dx of 0.5 x (1 + tanh(u)), u = c (x + k x^3):
    0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 k x^2)."""
    t = torch.tanh(_GELU_C * (x + _GELU_K * x.pow(3)))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * x * x)


# ----------------------------------------------------------------------------- TTT-Linear


def _linear_minibatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W: Tensor,
    b: Tensor,
    lw: Tensor,
    lb: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One mini-batch of m tokens. q, k, v: [B, H, m, d]; eta: [B, H, m, m] lower-triangular;
    W: [B, H, d, d]; b: [B, H, 1, d]. Returns (Zbar [B, H, m, d], W_next, b_next)."""
    grad_z = layer_norm_l2_grad(k @ W + b, v - k, lw, lb, eps)  # [B, H, m, d]
    # eta is already lower-triangular, so eta * (Q K^T) == eta * tril(Q K^T).
    attn = eta * (q @ k.transpose(-1, -2))
    zbar = q @ W - attn @ grad_z + b - eta @ grad_z
    eta_last = eta[..., -1, :, None]  # [B, H, m, 1]: the rates that produce W_m
    W_next = W - (eta_last * k).transpose(-1, -2) @ grad_z
    b_next = b - (eta_last * grad_z).sum(-2, keepdim=True)
    return zbar, W_next, b_next


def ttt_linear_dual(
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
    """TTT-Linear, mini-batch dual form. See :func:`neotron.kernels.ttt.ttt_linear`."""
    check_inputs(xq, xk, xv, eta, ln_weight, ln_bias, mini_batch_size)
    B, H, T, d = xq.shape
    cdt = compute_dtype(xq)
    q, k, v = xq.to(cdt), xk.to(cdt), xv.to(cdt)
    W, b = initial_states((W0, b0), ((d, d), (1, d)), initial_state, B, H, cdt)
    eta = torch.tril(eta.to(cdt)).expand(B, H, -1, -1, -1)
    lw, lb = ln_weight.to(cdt).view(1, H, 1, d), ln_bias.to(cdt).view(1, H, 1, d)

    # split/unbind, not q[:, :, s:e]: slicing gives one backward node per mini-batch that
    # allocates and fills a full-size zero gradient (quadratic in T); split's is linear.
    qs, ks, vs = (x.split(mini_batch_size, dim=2) for x in (q, k, v))
    etas = eta.unbind(2)
    zbars = []
    for n, (qn, kn, vn) in enumerate(zip(qs, ks, vs)):
        m = qn.shape[2]
        zbar, W, b = _linear_minibatch(qn, kn, vn, etas[n][..., :m, :m], W, b, lw, lb, eps)
        zbars.append(zbar)
    if zbars:
        z = q + layer_norm(torch.cat(zbars, dim=2), lw, lb, eps)
    else:
        z = q
    return z.to(xq.dtype), ((W, b) if output_final_state else None)


# -------------------------------------------------------------------------------- TTT-MLP


def _mlp_minibatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    lw: Tensor,
    lb: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One mini-batch of TTT-MLP (paper Appendix A). W1: [B, H, d, 4d], W2: [B, H, 4d, d]."""
    # Inner forward on the keys at the mini-batch's starting weights, and its closed-form
    # backward: LN + L2 at Z2, then through W2 and gelu' to Z1.
    z1 = k @ W1 + b1
    x2 = gelu_tanh(z1)
    grad_z2 = layer_norm_l2_grad(x2 @ W2 + b2, v - k, lw, lb, eps)
    grad_z1 = (grad_z2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
    # Dual form, layer by layer: the query's layer-2 input X2bar depends on the updated W1.
    z1bar = q @ W1 - (eta * (q @ k.transpose(-1, -2))) @ grad_z1 + b1 - eta @ grad_z1
    x2bar = gelu_tanh(z1bar)
    z2bar = x2bar @ W2 - (eta * (x2bar @ x2.transpose(-1, -2))) @ grad_z2 + b2 - eta @ grad_z2
    eta_last = eta[..., -1, :, None]
    W1 = W1 - (eta_last * k).transpose(-1, -2) @ grad_z1
    b1 = b1 - (eta_last * grad_z1).sum(-2, keepdim=True)
    W2 = W2 - (eta_last * x2).transpose(-1, -2) @ grad_z2
    b2 = b2 - (eta_last * grad_z2).sum(-2, keepdim=True)
    return z2bar, W1, b1, W2, b2


def ttt_mlp_dual(
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
    """TTT-MLP, mini-batch dual form. See :func:`neotron.kernels.ttt.ttt_mlp`."""
    check_inputs(xq, xk, xv, eta, ln_weight, ln_bias, mini_batch_size)
    B, H, T, d = xq.shape
    hidden = W1.shape[-1]
    cdt = compute_dtype(xq)
    q, k, v = xq.to(cdt), xk.to(cdt), xv.to(cdt)
    state = initial_states(
        (W1, b1, W2, b2), ((d, hidden), (1, hidden), (hidden, d), (1, d)), initial_state, B, H, cdt
    )
    eta = torch.tril(eta.to(cdt)).expand(B, H, -1, -1, -1)
    lw, lb = ln_weight.to(cdt).view(1, H, 1, d), ln_bias.to(cdt).view(1, H, 1, d)

    qs, ks, vs = (x.split(mini_batch_size, dim=2) for x in (q, k, v))  # see ttt_linear_dual
    etas = eta.unbind(2)
    zbars = []
    for n, (qn, kn, vn) in enumerate(zip(qs, ks, vs)):
        m = qn.shape[2]
        zbar, *state = _mlp_minibatch(qn, kn, vn, etas[n][..., :m, :m], *state, lw, lb, eps)
        zbars.append(zbar)
    if zbars:
        z = q + layer_norm(torch.cat(zbars, dim=2), lw, lb, eps)
    else:
        z = q
    final = (state[0], state[1], state[2], state[3]) if output_final_state else None
    return z.to(xq.dtype), final

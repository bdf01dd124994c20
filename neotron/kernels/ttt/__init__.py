"""TTT layers' inner loops: TTT-Linear and TTT-MLP (Sun et al., arXiv 2407.04620).

Layout: ``xq, xk, xv`` are ``[batch, heads, time, head_dim]`` (B, H, T, d), already projected
(and, in the layer, convolved / rotated) per head. The output ``z`` has the same shape and dtype
as ``xq``; the inner loop itself always runs in fp32 (fp64 for fp64 inputs) and the final state
is returned in that compute dtype.

``eta``: ``[B | 1, H | 1, N, b, b]`` with ``N = ceil(T / b)``, ``b = mini_batch_size``:
``eta[..., n, i, j]`` is the learning rate that token ``n*b + j``'s gradient gets in the
weights used by token ``n*b + i``. Only ``j <= i`` is read (the kernels apply ``tril``); in a
shorter last mini-batch of r tokens only ``[:r, :r]`` is read. Build it from the official
factorization ``eta_ij = token_eta_i * lr_eta_j`` with :func:`ttt_eta`.

``impl``: ``"auto"`` (currently the dual form on every device), ``"dual"`` (mini-batch dual
form, :mod:`.dual`) or ``"reference"`` (primal form with per-token autograd, :mod:`.reference`;
tests only).
"""

from __future__ import annotations

from torch import Tensor

from neotron.kernels.ttt.dual import LinearState, MLPState, ttt_eta, ttt_linear_dual, ttt_mlp_dual
from neotron.kernels.ttt.reference import ttt_linear_reference, ttt_mlp_reference

__all__ = ["LinearState", "MLPState", "ttt_eta", "ttt_linear", "ttt_mlp"]

_IMPLS = ("auto", "dual", "reference")


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")


def ttt_linear(
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
    impl: str = "auto",
) -> tuple[Tensor, LinearState | None]:
    """TTT-Linear inner loop: per head, inner model ``f(x; W, b) = x + LN(x W + b)`` trained
    online on ``l = 1/2 || LN(k W + b) - (v - k) ||^2`` with mini-batch gradient descent, and
    output ``z_t = f(q_t; W_t, b_t)``.

    Args:
        xq, xk, xv: ``[B, H, T, d]``.
        eta: ``[B|1, H|1, ceil(T/b), b, b]`` learning rates (see the module docstring).
        W0: ``[H, d, d]`` (or ``[B, H, d, d]``), the learnable initial inner weight.
        b0: ``[H, 1, d]`` (or ``[B, H, 1, d]``), the learnable initial inner bias.
        ln_weight, ln_bias: ``[H, d]``, the inner model's per-head LayerNorm.
        mini_batch_size: b, tokens per inner mini-batch (official: 16).
        initial_state: ``(W [B, H, d, d], b [B, H, 1, d])`` to start from instead of
            ``(W0, b0)``, e.g. the final state of the previous segment of the same sequences.
        output_final_state: also return the weights after the last token.
        eps: the inner LayerNorm's epsilon (official: 1e-6).

    Returns:
        ``(z [B, H, T, d] in xq's dtype, (W [B, H, d, d], b [B, H, 1, d]) or None)``.
        Splitting a sequence at a mini-batch boundary and chaining the state reproduces the
        unsplit result.
    """
    _check_impl(impl)
    fn = ttt_linear_reference if impl == "reference" else ttt_linear_dual
    return fn(
        xq, xk, xv, eta, W0, b0, ln_weight, ln_bias, mini_batch_size=mini_batch_size,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps,
    )  # fmt: skip


def ttt_mlp(
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
    impl: str = "auto",
) -> tuple[Tensor, MLPState | None]:
    """TTT-MLP inner loop: as :func:`ttt_linear` with the inner model
    ``f(x) = x + LN(gelu_tanh(x W1 + b1) W2 + b2)``.

    Args:
        xq, xk, xv, eta, ln_weight, ln_bias, mini_batch_size, eps: as in :func:`ttt_linear`.
        W1: ``[H, d, D]``, b1: ``[H, 1, D]``, W2: ``[H, D, d]``, b2: ``[H, 1, d]`` (each may
            also carry a leading batch dim), D the hidden width (official: 4d).
        initial_state: ``(W1, b1, W2, b2)`` with a leading batch dim, replacing the above.

    Returns:
        ``(z [B, H, T, d], (W1, b1, W2, b2) [B, H, ...] or None)``.
    """
    _check_impl(impl)
    fn = ttt_mlp_reference if impl == "reference" else ttt_mlp_dual
    return fn(
        xq, xk, xv, eta, W1, b1, W2, b2, ln_weight, ln_bias, mini_batch_size=mini_batch_size,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps,
    )  # fmt: skip

"""Delta rule, recurrent form: one token at a time, exactly as the equations read.

Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
arXiv 2406.06484, eq. (1)-(2); Schlag et al., "Linear Transformers Are Secretly Fast Weight
Programmers", arXiv 2102.11174. Written from the equations (not from fla's naive.py).

With state S in R^{d_k x d_v} (one per batch element and head):

    u_t = beta_t (v_t - S_{t-1}^T k_t)    # what the memory gets wrong about v_t, times a rate
    S_t = S_{t-1} + k_t u_t^T             # write the correction under key k_t
    o_t = S_t^T (scale q_t)

This is the oracle every faster path is tested against; it is slow (O(T) Python steps).
"""

from __future__ import annotations

import torch

from neotron.kernels.delta_rule.varlen import check_inputs, compute_dtype

Tensor = torch.Tensor


def _recurrence(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """q, k: [B, T, H, d_k] (q already scaled); v: [B, T, H, d_v]; beta: [B, T, H];
    state: [B, H, d_k, d_v]. Returns o [B, T, H, d_v] and the state after the last token."""
    outs = []
    for t in range(q.shape[1]):
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)  # S^T k_t
        u_t = beta_t * (v_t - predicted)
        state = state + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs, dim=1), state


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token delta rule. Layout [batch, time, heads, dim]; beta [batch, time, heads].

    Computes in fp64 for fp64 inputs, else fp32; `o` comes back in q's dtype and the final
    state ([batch or num_seqs, heads, d_k, d_v]) in the compute dtype.
    """
    bounds = check_inputs(q, k, v, beta, None, initial_state, cu_seqlens)
    dtype = compute_dtype(q, k, v, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc, bc = (x.to(dtype) for x in (q, k, v, beta))
    qc = qc * scale
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    n_state = b if bounds is None else len(bounds) - 1
    if initial_state is None:
        s0 = q.new_zeros(n_state, h, dk, dv, dtype=dtype)
    else:
        s0 = initial_state.to(dtype)

    if bounds is None:
        o, final = _recurrence(qc, kc, vc, bc, s0)
    else:
        # Packed documents: each one is an independent sequence with its own initial state.
        outs, finals = [], []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = slice(start, end)
            o_i, s_i = _recurrence(qc[:, sl], kc[:, sl], vc[:, sl], bc[:, sl], s0[i : i + 1])
            outs.append(o_i)
            finals.append(s_i)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    return o.to(q.dtype), (final if output_final_state else None)

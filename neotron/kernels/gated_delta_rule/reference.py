"""Gated delta rule, recurrent form: one token at a time, exactly as the equations read.

Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
arXiv 2412.06464, eq. (10). Written from the equations (not from fla's naive.py).

g_t is the per-token, per-head *log* decay (alpha_t = exp(g_t) in (0, 1]):

    S'  = exp(g_t) S_{t-1}                # forget first (Mamba2-style gate)
    u_t = beta_t (v_t - S'^T k_t)         # delta-rule correction against the decayed memory
    S_t = S' + k_t u_t^T
    o_t = S_t^T (scale q_t)

With g = 0 this is exactly the delta rule. Slow (O(T) Python steps): it is the oracle.
"""

from __future__ import annotations

import torch

from neotron.kernels.delta_rule.varlen import check_inputs, compute_dtype

Tensor = torch.Tensor


def _recurrence(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """q, k: [B, T, H, d_k] (q already scaled); v: [B, T, H, d_v]; g, beta: [B, T, H];
    state: [B, H, d_k, d_v]. Returns o [B, T, H, d_v] and the state after the last token."""
    outs = []
    for t in range(q.shape[1]):
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None]
        state = torch.exp(g[:, t])[..., None, None] * state
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
        u_t = beta_t * (v_t - predicted)
        state = state + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs, dim=1), state


def gated_delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token gated delta rule. Layout [batch, time, heads, dim]; g (log decay) and
    beta are [batch, time, heads]. Argument order (g before beta) follows fla's
    `chunk_gated_delta_rule`.

    Computes in fp64 for fp64 inputs, else fp32; `o` comes back in q's dtype and the final
    state ([batch or num_seqs, heads, d_k, d_v]) in the compute dtype.
    """
    bounds = check_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc, gc, bc = (x.to(dtype) for x in (q, k, v, g, beta))
    qc = qc * scale
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    n_state = b if bounds is None else len(bounds) - 1
    if initial_state is None:
        s0 = q.new_zeros(n_state, h, dk, dv, dtype=dtype)
    else:
        s0 = initial_state.to(dtype)

    if bounds is None:
        o, final = _recurrence(qc, kc, vc, gc, bc, s0)
    else:
        outs, finals = [], []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = slice(start, end)
            o_i, s_i = _recurrence(
                qc[:, sl], kc[:, sl], vc[:, sl], gc[:, sl], bc[:, sl], s0[i : i + 1]
            )
            outs.append(o_i)
            finals.append(s_i)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    return o.to(q.dtype), (final if output_final_state else None)

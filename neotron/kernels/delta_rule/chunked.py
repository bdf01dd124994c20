"""Delta rule, chunkwise-parallel form in plain PyTorch (the CPU fast path, and the GPU
fallback for fp32 or when fla is absent).

Math: Yang et al., arXiv 2406.06484, section 3 (WY / UT representation); the gated variant
follows Yang, Kautz, Hatamizadeh, arXiv 2412.06464, section 3.3. fla's
`fla/ops/delta_rule/README.md` derives the same algorithm; this is our own implementation.

For one chunk of C tokens (rows of K, V, Q; beta a vector; S the state entering the chunk),
the within-chunk corrections u_t = beta_t (v_t - S_{t-1}^T k_t) satisfy the unit
lower-triangular system

    (I + A) u = diag(beta) (V - diag(b) K S),   A_ti = beta_t gamma_ti (k_t . k_i), i < t,

where (gated case, g the log decay and G its in-chunk cumulative sum) b_t = exp(G_t) and
gamma_ti = exp(G_t - G_i); the ungated case is b = gamma = 1. Hence, with
T = (I + A)^{-1} diag(beta) (the UT transform),

    W = T diag(b) K,   U = T V,   u = U - W S                     (1)
    O = diag(b) Q S + ((Q K^T) * gamma * causal) u                  (2)
    S' = exp(G_C) S + (K * exp(G_C - G_t))^T u                     (3)

W, U and the masked Q K^T depend only on the chunk's inputs, so they are computed for all
chunks, heads and batch rows at once; only (1) and (3) — two small matmuls per chunk — are a
sequential pass, and (2) is batched again after it. Every exponent above is a difference
G_t - G_i with i <= t (or G_t itself), which is <= 0 for a decay, so no exp can overflow.

Autograd runs through all of it (solve_triangular has a derivative); no custom backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neotron.kernels.delta_rule.varlen import check_inputs, compute_dtype, pack_plan

Tensor = torch.Tensor


def _pad_time(x: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return x
    # x is [B, T, H] or [B, T, H, D]; pad the time axis (dim 1) at the end with zeros.
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def chunked_delta_rule_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    *,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Shared engine of `delta_rule_chunked` (g=None) and `gated_delta_rule_chunked`."""
    bounds = check_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = compute_dtype(q, k, v, beta, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    C = chunk_size
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    dev = q.device
    qc, kc, vc, bc = (x.to(dtype) for x in (q, k, v, beta))
    gc = None if g is None else g.to(dtype)
    qc = qc * scale

    # ---- lay the tokens out as [rows, chunks * C]; padding tokens have k = v = q = beta = g = 0,
    # which leaves the state untouched (no write, decay exp(0) = 1).
    n_seqs = b if bounds is None else len(bounds) - 1
    if initial_state is None:
        s0_all = q.new_zeros(n_seqs, h, dk, dv, dtype=dtype)
    else:
        s0_all = initial_state.to(dtype)
    if bounds is None:
        rows, n_chunks = b, max(1, -(-t // C))
        pad = n_chunks * C - t

        def layout(x: Tensor) -> Tensor:
            return _pad_time(x, pad)

        s0 = s0_all
        plan = None
    else:
        plan = pack_plan(bounds, C, dev)
        rows, n_chunks = plan.rows, plan.chunks

        def layout(x: Tensor) -> Tensor:
            # Append one zero token that every padding slot of the layout points at.
            src = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])], dim=0)
            return src[plan.gather].view(rows, n_chunks * C, *x.shape[2:])

        s0 = s0_all[plan.first_seq]

    def chunks4(x: Tensor) -> Tensor:  # [R, N*C, H, D] -> [N, R, H, C, D]
        return layout(x).view(rows, n_chunks, C, h, x.shape[-1]).permute(1, 0, 3, 2, 4)

    def chunks3(x: Tensor) -> Tensor:  # [R, N*C, H] -> [N, R, H, C]
        return layout(x).view(rows, n_chunks, C, h).permute(1, 0, 3, 2)

    Q, K, V, Bt = chunks4(qc), chunks4(kc), chunks4(vc), chunks3(bc)

    # ---- intra-chunk work, all chunks at once.
    ones = torch.ones(C, C, dtype=torch.bool, device=dev)
    causal = torch.tril(ones)  # i <= t: token t sees itself (o_t reads S_t)
    strict = torch.tril(ones, -1)  # i < t: earlier tokens in the chunk
    Kb = K * Bt[..., None]  # diag(beta) K: beta scales the rows of A and of the right-hand side
    KKt = Kb @ K.transpose(-1, -2)  # [N, R, H, C, C], row t scaled by beta_t
    QKt = Q @ K.transpose(-1, -2)
    if gc is None:
        A = KKt.masked_fill(~strict, 0.0)
        Aqk = QKt.masked_fill(~causal, 0.0)
        rhs_k = Kb
        Qb, Kd, decay = Q, K, None
    else:
        G = chunks3(gc).cumsum(-1)  # [N, R, H, C], in-chunk cumulative log decay
        # Mask *before* exp: above the diagonal G_t - G_i > 0 and could overflow.
        gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        A = (KKt * gamma).masked_fill(~strict, 0.0)
        Aqk = QKt * gamma
        b_t = G.exp()
        rhs_k = Kb * b_t[..., None]
        Qb = Q * b_t[..., None]
        Kd = K * (G[..., -1:] - G).exp()[..., None]  # decay from token t to the chunk end
        decay = G[..., -1].exp().reshape(n_chunks, rows * h, 1, 1)
    # UT transform: solve (I + A) [W | U] = [diag(beta b) K | diag(beta) V] for every chunk in one
    # batched triangular solve (backward-stable, unlike forming the inverse). unitriangular=True
    # takes the unit diagonal as given, so the strictly lower A is passed as is.
    WU = torch.linalg.solve_triangular(
        A, torch.cat([rhs_k, V * Bt[..., None]], dim=-1), upper=False, unitriangular=True
    )
    W = WU[..., :dk].reshape(n_chunks, rows * h, C, dk)
    U = WU[..., dk:].reshape(n_chunks, rows * h, C, dv)
    KdT = Kd.transpose(-1, -2).reshape(n_chunks, rows * h, dk, C)

    # ---- the only sequential part: state entering each chunk, eqs. (1) and (3).
    # unbind, not W[n]: one backward node that stacks the per-chunk grads, where indexing
    # would allocate and fill a full-size zero gradient per chunk (quadratic in chunks).
    W_n, U_n, KdT_n = W.unbind(0), U.unbind(0), KdT.unbind(0)
    decay_n = None if decay is None else decay.unbind(0)
    S = s0.reshape(rows * h, dk, dv)
    states, us, after = [], [], []
    for n in range(n_chunks):
        if plan is not None and n in plan.resets:
            # A new document starts at chunk n in some rows: restart them from its initial state.
            mask, idx = plan.resets[n]
            fresh = s0_all[idx].reshape(rows * h, dk, dv)
            S = torch.where(mask.repeat_interleave(h)[:, None, None], fresh, S)
        states.append(S)
        u = torch.baddbmm(U_n[n], W_n[n], S, alpha=-1.0)  # U - W S
        us.append(u)
        S = torch.baddbmm(S if decay_n is None else S * decay_n[n], KdT_n[n], u)
        after.append(S)

    # ---- outputs, eq. (2), all chunks at once.
    S_in = torch.stack(states).view(n_chunks, rows, h, dk, dv)
    u_all = torch.stack(us).view(n_chunks, rows, h, C, dv)
    o = Qb @ S_in + Aqk @ u_all  # [N, R, H, C, dv]
    o = o.permute(1, 0, 3, 2, 4).reshape(rows, n_chunks * C, h, dv)
    if plan is None:
        o = o[:, :t]
    else:
        o = o.reshape(rows * n_chunks * C, h, dv)[plan.scatter].unsqueeze(0)

    final = None
    if output_final_state:
        if plan is None:
            final = S.view(rows, h, dk, dv)
        else:
            finals = []
            for i, (step, row) in enumerate(zip(plan.end_step, plan.end_row)):
                if row < 0:  # empty document: its state never changes
                    finals.append(s0_all[i])
                else:
                    finals.append(after[step].view(rows, h, dk, dv)[row])
            final = torch.stack(finals)
    return o.to(q.dtype), final


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise-parallel delta rule. Same contract as `delta_rule_reference`: layout
    [batch, time, heads, dim], fp32 compute (fp64 kept), `o` in q's dtype, final state
    [batch or num_seqs, heads, d_k, d_v] in the compute dtype."""
    return chunked_delta_rule_core(
        q,
        k,
        v,
        beta,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )

"""Gated delta rule (Gated DeltaNet) kernels: `reference.py` (recurrent oracle), `chunked.py`
(chunkwise WY/UT form in PyTorch), and fla's Triton kernel on CUDA when it is installed.

`gated_delta_rule` picks the fastest path that supports the inputs; `impl=` forces one.
"""

from __future__ import annotations

import torch

from neotron.kernels.delta_rule import Impl, check_impl, fla_op
from neotron.kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from neotron.kernels.gated_delta_rule.reference import gated_delta_rule_reference

Tensor = torch.Tensor

__all__ = ["gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_reference"]


def gated_delta_rule(
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
    chunk_size: int = 64,
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule with g the per-token, per-head log decay:
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T, o_t = S_t^T (scale q_t).

    Argument order (g before beta) is fla's `chunk_gated_delta_rule`. Shapes, dtypes, scale,
    cu_seqlens and impl are as in `neotron.kernels.delta_rule.delta_rule`; g: [B, T, H].
    """
    check_impl(impl)
    fn = fla_op("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", impl, q, k, v)
    if fn is not None:
        # fla asserts only on q's dtype; g (usually fp32, from A_log) and beta go as given.
        return fn(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    if impl == "reference":
        return gated_delta_rule_reference(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    return gated_delta_rule_chunked(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )

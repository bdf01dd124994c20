"""Gated delta rule, chunkwise-parallel form in plain PyTorch.

The engine is shared with the ungated delta rule (`neotron.kernels.delta_rule.chunked`), which
explains the math; the gate enters as in-chunk differences of cumulative log decays
(Yang, Kautz, Hatamizadeh, arXiv 2412.06464, section 3.3).
"""

from __future__ import annotations

import torch

from neotron.kernels.delta_rule.chunked import chunked_delta_rule_core

Tensor = torch.Tensor


def gated_delta_rule_chunked(
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
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise-parallel gated delta rule; g is the log decay (<= 0), argument order g, beta
    as in fla's `chunk_gated_delta_rule`. Same contract as `gated_delta_rule_reference`."""
    return chunked_delta_rule_core(
        q,
        k,
        v,
        beta,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )

"""Delta rule (DeltaNet) kernels: `reference.py` (recurrent oracle), `chunked.py` (chunkwise
WY/UT form in PyTorch), and fla's Triton kernel on CUDA when it is installed.

`delta_rule` picks the fastest path that supports the inputs; `impl=` forces one.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, Literal

import torch

from neotron.kernels.delta_rule.chunked import delta_rule_chunked
from neotron.kernels.delta_rule.reference import delta_rule_reference

Tensor = torch.Tensor
Impl = Literal["auto", "chunked", "reference", "fla"]

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_reference"]

# fla's chunk kernels assert on fp32 inputs ("does not support float32"), so only half
# precisions go to them; fp32/fp64 stay on the PyTorch chunked path.
FLA_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _load_fla(module: str, name: str) -> Callable[..., Any] | None:
    # Imported lazily and only once: `fla.ops` imports every Triton kernel (seconds), and fla
    # is an optional GPU dependency that must never be needed to import neotron.
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, or Triton failing to initialise without a driver
        return None


def fla_op(module: str, name: str, impl: str, *tensors: Tensor) -> Callable[..., Any] | None:
    """The fla function to call for these inputs, or None for the PyTorch path."""
    if impl == "fla":
        fn = _load_fla(module, name)
        if fn is None:
            raise RuntimeError(f"impl='fla' needs the optional fla package ({module}.{name})")
        return fn
    if impl != "auto":
        return None
    q = tensors[0]
    if not q.is_cuda or any(x.dtype != q.dtype for x in tensors) or q.dtype not in FLA_DTYPES:
        return None
    return _load_fla(module, name)


def check_impl(impl: str) -> None:
    if impl not in ("auto", "chunked", "reference", "fla"):
        raise ValueError(f"impl must be 'auto', 'chunked', 'reference' or 'fla', got {impl!r}")


def delta_rule(
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
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Delta rule: S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T, o_t = S_t^T (scale q_t).

    q, k: [B, T, H, d_k]; v: [B, T, H, d_v]; beta: [B, T, H]. scale defaults to d_k ** -0.5.
    q and k are used as given (the layer L2-normalizes them). initial_state / final state:
    [B, H, d_k, d_v], or [num_seqs, H, d_k, d_v] with `cu_seqlens` (batch must then be 1).
    Returns (o [B, T, H, d_v] in q's dtype, final_state or None).

    impl: "auto" = fla's `chunk_delta_rule` on CUDA for bf16/fp16 inputs when fla is
    installed, else "chunked"; "reference" = the token-by-token oracle; "fla" forces fla.
    chunk_size only affects the PyTorch chunked path (fla picks its own).
    """
    check_impl(impl)
    fn = fla_op("fla.ops.delta_rule", "chunk_delta_rule", impl, q, k, v, beta)
    if fn is not None:
        return fn(
            q,
            k,
            v,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    if impl == "reference":
        return delta_rule_reference(
            q,
            k,
            v,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    return delta_rule_chunked(
        q,
        k,
        v,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )

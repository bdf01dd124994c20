"""Weighted embedding bag: out[n] = sum_l weights[n, l] * table[idx[n, l]].

`reference.py` is the gather-multiply-sum oracle; `fast.py` is the fused forward with our own
backward (fused weight gradients, row gradients accumulated slot by slot, optionally returned
as a sparse gradient of the rows read). `embedding_bag` dispatches; `impl=` forces a path. Both run on CPU and CUDA.
"""

from __future__ import annotations

from typing import Literal

import torch

from neotron.kernels.embedding_bag.fast import embedding_bag_fast, table_row_grads
from neotron.kernels.embedding_bag.reference import embedding_bag_reference

__all__ = ["embedding_bag", "embedding_bag_fast", "embedding_bag_reference", "table_row_grads"]


def embedding_bag(
    table: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    sparse_grad: bool = False,
    impl: Literal["auto", "fast", "reference"] = "auto",
) -> torch.Tensor:
    """table [R, D], idx [N, L] (int64), weights [N, L] -> [N, D].

    sparse_grad: the fast path returns the table's gradient as a sparse COO tensor holding
    only the rows read (for optimizers that accept sparse gradients, e.g. SparseAdam).
    """
    if impl not in ("auto", "fast", "reference"):
        raise ValueError(f"impl must be 'auto', 'fast' or 'reference', got {impl!r}")
    if idx.dtype != torch.int64:
        idx = idx.long()
    if impl == "reference":
        if sparse_grad:
            raise ValueError("sparse_grad needs the fast path")
        return embedding_bag_reference(table, idx, weights)
    return embedding_bag_fast(table, idx, weights, sparse_grad=sparse_grad)

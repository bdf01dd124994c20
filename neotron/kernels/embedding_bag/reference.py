"""Weighted embedding bag, the plain way: gather the rows, weight them, sum.

    out[n] = sum_l weights[n, l] * table[idx[n, l]]

This is the oracle of the product-key memory's value read (Lample et al. 2019, arXiv
1907.05242; Berges et al. 2024, arXiv 2412.09764) and of MemoryFormer's hash-table read. It
materializes the gathered rows [N, L, D] in the forward and, through autograd's index
backward, a dense gradient of the whole table; the fast path (`fast.py`) does neither.
"""

from __future__ import annotations

import torch


def embedding_bag_reference(
    table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """table [R, D], idx [N, L] (int64, values in [0, R)), weights [N, L] -> [N, D]."""
    rows = table[idx]  # [N, L, D]
    return (weights.to(table.dtype).unsqueeze(-1) * rows).sum(dim=-2)

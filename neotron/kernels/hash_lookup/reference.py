"""MemoryFormer's hash-table lookup, the dense way (Ding et al., "MemoryFormer: Minimize
Transformer Computation by Removing Fully-Connected Layers", NeurIPS 2024, arXiv 2411.12992;
math as coded in C0-Design/MemoryFormer@59686737ec memory_module/).

The input z [N, K * tau] is cut into K chunks z_k of tau entries. Each chunk is hashed by the
signs of its entries, most significant bit first,

    code_k = sum_j [z_kj >= 0] * 2^(tau - 1 - j)          (an integer in [0, 2^tau))

and selects row code_k of its own table T_k [2^tau, d_out]. The row is weighted by a score
that is differentiable in z (the code is not):

    paper:  p_k = prod_j 1 / (1 + exp(-2 |z_kj|))        (the probability of the sign code
            among all 2^tau codes under softmax(<z_k, code>), temperature 1)
    l1:     s_k = ||z_k||_1 * p_k                          (what the official code computes)

    y = sum_k s_k * T_k[code_k]

This file computes y with a dense one-hot matrix, y = sum_k s_k * onehot(code_k) @ T_k, so
autograd produces the exact table and input gradients with no custom code: the oracle of
the fast path in `__init__.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Score = Literal["l1", "paper"]


def hash_codes(z: torch.Tensor) -> torch.Tensor:
    """z [..., K, tau] -> int64 codes [..., K]: the sign bits of each chunk, MSB first."""
    tau = z.shape[-1]
    bits = (z >= 0).long()
    weights = 2 ** torch.arange(tau - 1, -1, -1, device=z.device, dtype=torch.long)
    return (bits * weights).sum(-1)


def hash_scores(z: torch.Tensor, score: Score = "l1") -> torch.Tensor:
    """z [..., K, tau] -> scores [..., K] (differentiable through |z|)."""
    a = z.abs()
    # prod_j sigmoid(2|z_j|), as exp(sum log sigmoid) so that it cannot underflow piecewise
    p = F.logsigmoid(2 * a).sum(-1).exp()
    if score == "paper":
        return p
    if score == "l1":
        return a.sum(-1) * p
    raise ValueError(f"score must be 'l1' or 'paper', got {score!r}")


def hash_lookup_reference(z: torch.Tensor, tables: torch.Tensor, score: Score = "l1"
                          ) -> torch.Tensor:
    """z [N, K * tau], tables [K, 2^tau, d_out] -> y [N, d_out] (no bias)."""
    K, R, _ = tables.shape
    tau = R.bit_length() - 1
    if R != 2**tau or z.shape[-1] != K * tau:
        raise ValueError(f"z has {z.shape[-1]} features, tables {tuple(tables.shape)}:"
                         f" need K * tau = {K} * log2({R})")
    zk = z.reshape(z.shape[0], K, tau)
    onehot = F.one_hot(hash_codes(zk), R).to(tables.dtype)  # [N, K, R], constant
    weighted = onehot * hash_scores(zk, score).to(tables.dtype).unsqueeze(-1)
    return torch.einsum("nkr,krd->nd", weighted, tables)

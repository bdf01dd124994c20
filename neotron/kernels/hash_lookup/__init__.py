"""MemoryFormer hash lookup: y = sum_k s_k(z_k) * T_k[code(z_k)] (see reference.py).

`hash_lookup` computes the codes and scores in PyTorch (the scores carry the input's
gradient), then reads the K selected rows with the weighted embedding bag of
`neotron.kernels.embedding_bag`, whose fused forward gathers and sums in one pass and whose
backward scatters gradients only into the rows that were read. `impl="reference"` uses the
dense one-hot oracle instead.
"""

from __future__ import annotations

from typing import Literal

import torch

from neotron.kernels.embedding_bag import embedding_bag
from neotron.kernels.hash_lookup.reference import (
    Score,
    hash_codes,
    hash_lookup_reference,
    hash_scores,
)

__all__ = ["hash_codes", "hash_lookup", "hash_lookup_reference", "hash_scores"]


def hash_lookup(
    z: torch.Tensor,
    tables: torch.Tensor,
    *,
    score: Score = "l1",
    impl: Literal["auto", "fast", "reference"] = "auto",
) -> torch.Tensor:
    """z [N, K * tau], tables [K, 2^tau, d_out] -> [N, d_out] in the tables' dtype.

    Hash and score are computed in z's dtype: pass fp32 z (bf16 rounding flips the signs of
    entries near zero, i.e. changes codes)."""
    if impl == "reference":
        return hash_lookup_reference(z, tables, score)
    if impl not in ("auto", "fast"):
        raise ValueError(f"impl must be 'auto', 'fast' or 'reference', got {impl!r}")
    K, R, d_out = tables.shape
    tau = R.bit_length() - 1
    if R != 2**tau or z.shape[-1] != K * tau:
        raise ValueError(f"z has {z.shape[-1]} features, tables {tuple(tables.shape)}:"
                         f" need K * tau = {K} * log2({R})")
    zk = z.reshape(z.shape[0], K, tau)
    offsets = torch.arange(K, device=z.device, dtype=torch.long) * R
    idx = hash_codes(zk) + offsets  # rows of the flattened [K * R, d_out] table
    return embedding_bag(tables.reshape(K * R, d_out), idx, hash_scores(zk, score))

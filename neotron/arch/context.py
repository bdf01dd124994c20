"""What a layer needs to know about its place in the model (build time) and about the
sequence it is processing (forward time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neotron.arch.registry import LayerConfig


@dataclass(frozen=True)
class BuildContext:
    dim: int
    layer_idx: int
    n_layers: int
    linear: LayerConfig  # the model's default projection config, for make_linear
    norm_eps: float
    init_std: float

    @property
    def out_std(self) -> float:
        # Residual-branch output projections are scaled down with depth so the residual
        # stream's variance does not grow with n_layers (GPT-2, Radford et al. 2019).
        return self.init_std / (2 * self.n_layers) ** 0.5


@dataclass
class SeqInfo:
    """Per-batch sequence facts shared by all layers of one forward.

    positions: [T] or [B, T] token positions (RoPE); doc_ids: [B, T] document index of each
    token inside a packed row, or None when documents are not masked from each other.
    """

    positions: torch.Tensor
    doc_ids: torch.Tensor | None = None

    @classmethod
    def for_tokens(cls, tokens: torch.Tensor) -> SeqInfo:
        return cls(positions=torch.arange(tokens.shape[1], device=tokens.device))

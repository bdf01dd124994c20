"""What a layer needs to know about its place in the model (build time) and about the
sequence it is processing (forward time)."""

from __future__ import annotations

import functools
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
    # globs of projections kept dense whatever `linear` says (model.linear_exclude)
    linear_exclude: tuple[str, ...] = ()

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
    def for_tokens(cls, tokens: torch.Tensor, eos_id: int | None = None) -> SeqInfo:
        """Positions 0..T-1; with `eos_id`, documents of a packed row are kept apart: a new
        document starts after each EOS token, and positions restart at 0 in each."""
        T = tokens.shape[1]
        idx = torch.arange(T, device=tokens.device)
        if eos_id is None:
            return cls(positions=idx)
        is_eos = (tokens == eos_id).long()
        doc_ids = is_eos.cumsum(dim=1) - is_eos  # the EOS belongs to the document it ends
        starts = torch.zeros_like(is_eos, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = is_eos[:, :-1].bool()
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        return cls(positions=idx - first, doc_ids=doc_ids)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor | None:
        """Document boundaries with the batch flattened into one packed row of B*T tokens, in
        the flash-attn / fla convention [0, end_1, end_2, ..., B*T] (int64), or None without
        doc_ids. A row start is always a boundary: no document spans two rows. Recurrent
        mixers feed their [B, T, ...] tensors to varlen kernels as [1, B*T, ...] with these."""
        if self.doc_ids is None:
            return None
        B, T = self.doc_ids.shape
        starts = torch.ones_like(self.doc_ids, dtype=torch.bool)
        starts[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        idx = starts.flatten().nonzero().squeeze(1)
        return torch.cat([idx, idx.new_full((1,), B * T)])

"""CausalLM: embed -> blocks -> norm -> head, built on the meta device, initialized
explicitly by `init_weights` once it has real storage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neotron.arch.config import ModelConfig
from neotron.arch.context import SeqInfo
from neotron.arch.norm import RMSNorm
from neotron.arch.stack import build_layers, run_stack, stack_flops


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        # the unique blocks; with model.recursion, one stack looped (neotron/arch/stack.py)
        self.layers = build_layers(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # The head stays dense whatever `model.linear` says: quantizing or hashing the LM head
        # is a separate decision that most recipes (BitNet, MemoryFormer) do not take.
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.trunc_normal_(self.embed.weight, std=std, a=-3 * std, b=3 * std)
        for layer in self.layers:
            layer.init_weights()
        self.norm.init_weights()
        if self.head is not None:
            # fan-in scaled so initial logits are O(1) whatever the width
            hstd = self.cfg.dim**-0.5
            nn.init.trunc_normal_(self.head.weight, std=hstd, a=-3 * hstd, b=3 * hstd)

    def forward(self, tokens: torch.Tensor, seq: SeqInfo | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. `seq` carries positions and document
        boundaries (SeqInfo.for_tokens); by default one document per row."""
        seq = seq if seq is not None else SeqInfo.for_tokens(tokens)
        h = self.embed(tokens)
        return self.logits(run_stack(self.layers, h, seq, self.cfg))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the (possibly tied) head: residual stream [..., dim] -> logits."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(self.norm(h), weight)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token; the embedding lookup is free."""
        head = 6.0 * self.cfg.dim * self.cfg.vocab_size
        return head + stack_flops(self.layers, seq_len, self.cfg)  # every loop counted

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Stored parameters, shared ones once. `exclude_embedding` drops the input embedding
        only when the head is untied (a tied one is the head's matmul weight too): the "6 N"
        of a matmul count. neotron.arch.accounting.param_counts has the total / active /
        embedding / non-embedding split of docs/accounting.md."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.head is not None:
            n -= self.embed.weight.numel()
        return n


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> CausalLM:
    """Build on `device` (meta by default: no memory, no init). Call `materialize` next."""
    with torch.device(device):
        return CausalLM(cfg)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Give a meta-device model real storage on `device` and initialize it from `seed`.

    nn.init draws from torch's global RNG, so it is seeded here: the same seed gives the same
    weights whatever happened before in the process.
    """
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model

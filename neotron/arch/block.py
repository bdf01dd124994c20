"""Pre-norm residual block: x + mixer(norm(x)), then + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import FFNS, MIXERS


class Block(nn.Module):
    def __init__(self, ctx: BuildContext, block_cfg) -> None:  # block_cfg: arch.config.BlockConfig
        super().__init__()
        self.mixer_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.mixer = MIXERS.build(block_cfg.mixer, ctx)
        self.ffn_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.ffn = FFNS.build(block_cfg.ffn, ctx)

    def init_weights(self) -> None:
        self.mixer_norm.init_weights()
        self.ffn_norm.init_weights()
        self.mixer.init_weights()
        self.ffn.init_weights()

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), seq)
        return x + self.ffn(self.ffn_norm(x), seq)

    def flops_per_token(self, seq_len: int) -> float:
        return self.mixer.flops_per_token(seq_len) + self.ffn.flops_per_token(seq_len)

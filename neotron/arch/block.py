"""Pre-norm residual block: x + mixer(norm(x)), then + ffn(norm(x)), each branch optionally
through dropout (GPT-2's residual dropout; off by default, as in most pretraining recipes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import keep_dense
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import FFNS, MIXERS


class Block(nn.Module):
    def __init__(self, ctx: BuildContext, block_cfg, dropout: float = 0.0) -> None:
        # block_cfg: arch.config.BlockConfig
        super().__init__()
        self.dropout = dropout
        self.mixer_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.mixer = MIXERS.build(block_cfg.mixer, ctx)
        self.ffn_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.ffn = FFNS.build(block_cfg.ffn, ctx)
        if ctx.linear_exclude:
            keep_dense(self, ctx.linear_exclude, prefix=f"layers.{ctx.layer_idx}.")

    def init_weights(self) -> None:
        self.mixer_norm.init_weights()
        self.ffn_norm.init_weights()
        self.mixer.init_weights()
        self.ffn.init_weights()

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        x = x + self._drop(self.mixer(self.mixer_norm(x), seq))
        return x + self._drop(self.ffn(self.ffn_norm(x), seq))

    def prefill(self, x: torch.Tensor, seq: SeqInfo) -> tuple[torch.Tensor, object]:
        """`forward` for decoding (no dropout), also returning the mixer's state after x."""
        h, state = self.mixer.prefill(self.mixer_norm(x), seq)
        x = x + h
        return x + self.ffn(self.ffn_norm(x), seq), state

    def step(self, x_t: torch.Tensor, state: object, seq: SeqInfo) -> tuple[torch.Tensor, object]:
        """One token x_t [B, dim]; every FFN is per-token, so it sees x_t as a length-1 row."""
        h, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + h
        return x_t + self.ffn(self.ffn_norm(x_t[:, None]), seq)[:, 0], state

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, self.training) if self.dropout > 0 else h

    def flops_per_token(self, seq_len: int) -> float:
        return self.mixer.flops_per_token(seq_len) + self.ffn.flops_per_token(seq_len)

"""SwiGLU feed-forward (Shazeer, arXiv 2002.05202)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import make_linear
from neotron.arch.registry import FFNS, LayerConfig


class SwiGLUConfig(LayerConfig):
    type: Literal["swiglu"] = "swiglu"
    hidden_dim: int | None = Field(default=None, gt=0, description="None = 8/3 dim, rounded")
    multiple_of: int = Field(default=64, gt=0)

    def hidden(self, dim: int) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(8 * dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def check(self, dim: int) -> list[tuple[str, str]]:
        return []


@FFNS.register(SwiGLUConfig)
class SwiGLU(nn.Module):
    def __init__(self, ctx: BuildContext, *, cfg: SwiGLUConfig) -> None:
        super().__init__()
        self.ctx = ctx
        hidden = cfg.hidden(ctx.dim)
        self.w1 = make_linear(ctx.dim, hidden, ctx.linear)  # gate
        self.w3 = make_linear(ctx.dim, hidden, ctx.linear)  # up
        self.w2 = make_linear(hidden, ctx.dim, ctx.linear)  # down

    def init_weights(self) -> None:
        self.w1.init_weights(self.ctx.init_std)
        self.w3.init_weights(self.ctx.init_std)
        self.w2.init_weights(self.ctx.out_std)

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def flops_per_token(self, seq_len: int) -> float:
        return sum(m.flops_per_token(seq_len) for m in (self.w1, self.w3, self.w2))

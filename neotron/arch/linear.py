"""The one projection factory. Every block builds its projections through `make_linear`, so
quantization (BitNet, FP4), TokenFormer's Pattention and MemoryFormer's hash layers can
replace any projection by config alone."""

from __future__ import annotations

from typing import Literal

from torch import nn

from neotron.arch.registry import LINEARS, LayerConfig


class DenseLinearConfig(LayerConfig):
    type: Literal["dense"] = "dense"


@LINEARS.register(DenseLinearConfig)
class DenseLinear(nn.Linear):
    """nn.Linear that knows its training FLOPs and how to initialize itself."""

    def __init__(self, in_dim: int, out_dim: int, *, cfg: DenseLinearConfig, bias: bool = False):
        super().__init__(in_dim, out_dim, bias=bias)
        self.cfg = cfg

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def flops_per_token(self, seq_len: int) -> float:
        # forward 2*in*out, backward twice that (input and weight gradients)
        return 6.0 * self.in_features * self.out_features


def make_linear(in_dim: int, out_dim: int, cfg: LayerConfig, *, bias: bool = False) -> nn.Module:
    """Build the projection `cfg.type` names (dense, bitnet, fp4, pattention, ...)."""
    return LINEARS.build(cfg, in_dim, out_dim, bias=bias)

"""The one projection factory. Every block builds its projections through `make_linear`, so
quantization (BitNet, FP4), TokenFormer's Pattention and MemoryFormer's hash layers can
replace any projection by config alone."""

from __future__ import annotations

from fnmatch import fnmatchcase
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


def keep_dense(block: nn.Module, patterns: tuple[str, ...], prefix: str) -> None:
    """The precision policy's exceptions (`model.linear_exclude`): every projection of `block`
    built by `make_linear` as a non-dense type (bitnet, fp4, pattention, memoryformer) whose
    name (`prefix` + its name in the block, as in the model's state_dict, e.g.
    `layers.0.mixer.wo`) matches one of the glob `patterns` is rebuilt as a dense projection of
    the same shape. Called by the block at build time, before initialization and before
    anything (per-depth LoRA hooks) holds on to its projections."""
    linear_types = tuple(LINEARS.get(name).module_cls for name in LINEARS.names())
    for name, module in list(block.named_modules()):
        if not name or type(module) is DenseLinear or not isinstance(module, linear_types):
            continue
        if not any(fnmatchcase(prefix + name, pat) for pat in patterns):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            from neotron.errors import ConfigError

            raise ConfigError(f"model.linear_exclude: '{prefix + name}' is a"
                              f" {type(module).__name__}, which has no dense weight to keep")
        out_dim, in_dim = weight.shape
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, DenseLinear(in_dim, out_dim, cfg=DenseLinearConfig(),
                                           bias=getattr(module, "bias", None) is not None))

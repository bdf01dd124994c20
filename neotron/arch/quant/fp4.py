"""FP4Linear: Quartet-style FP4 (MXFP4, or NVFP4) quantization-aware training, simulated;
registered as linear type `fp4`.

Castro, Panferov et al., "Quartet: Native FP4 Training Can Be Optimal for Large Language
Models", arXiv 2505.14669 (code: IST-DASLab/Quartet, a simulation repo). Per projection, with
H = H_32 / sqrt(32) applied along the inner dimension in blocks of 32 (neotron.kernels.quant):

    forward    y = Q_rtn(x H) Q_rtn(W H)^T        MXFP4: E2M1 values, one power-of-two scale per
                                                  group of 32 (2^floor(log2(0.4871 std))),
                                                  round to nearest, clipped at |x/s| = 6
    backward   dX~ = Q_sr(E R) Q_sr(W~^T R)^T      R = diag(random signs) H, drawn per GEMM and
               dW~ = Q_sr(E^T R') Q_sr(X~^T R')^T  step; stochastic rounding (unbiased)
               dX = (dX~ * 1[|xH/s| < 6]) H^T, dW likewise (trust masks, then undo the rotation)

`backward: ste` keeps the forward and the masks but runs the backward GEMMs in full precision.
`format: nvfp4` uses groups of 16 with an FP8 E4M3 scale per group (and an fp32 one per tensor),
absmax-scaled in the forward.

Hopper GPUs have no FP4 tensor cores: the values are rounded to FP4 and the matmuls run in
bf16/fp32, so this measures FP4 training's accuracy, not its speed. FLOPs are counted as the
dense matmul's, and MFU against the bf16 peak (never an FP4 peak).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from neotron.arch.linear import DenseLinear
from neotron.arch.registry import LINEARS, LayerConfig
from neotron.errors import ConfigError
from neotron.kernels.quant import GROUP_SIZE, fp4_linear


class FP4LinearConfig(LayerConfig):
    type: Literal["fp4"] = "fp4"
    format: Literal["mxfp4", "nvfp4"] = Field(
        default="mxfp4",
        description="mxfp4 = groups of 32, power-of-two scale (Quartet); nvfp4 = groups of 16,"
        " FP8 E4M3 scale",
    )
    hadamard: int = Field(
        default=32, ge=0,
        description="Hadamard block size along the inner dimension (a power of two); 0 = none",
    )
    backward: Literal["quartet", "ste"] = Field(
        default="quartet",
        description="quartet = FP4 backward GEMMs (random Hadamard, stochastic rounding);"
        " ste = full-precision backward GEMMs (forward quantization and clip masks only)",
    )

    @model_validator(mode="after")
    def _check_hadamard(self) -> FP4LinearConfig:
        if self.hadamard & (self.hadamard - 1):
            raise ValueError(f"@hadamard: must be a power of two or 0, got {self.hadamard}")
        return self

    def block(self) -> int:
        """The inner dimension must be a multiple of this (group and Hadamard sizes)."""
        g = GROUP_SIZE[self.format]
        return g * self.hadamard // math.gcd(g, self.hadamard) if self.hadamard else g


@LINEARS.register(FP4LinearConfig)
class FP4Linear(DenseLinear):
    """A dense projection (its init, and its FLOPs: the dense matmul's forward + backward; the
    Hadamard rotations and quantizers are simulation overhead, not counted, so MFU against the
    bf16 peak is never inflated) whose matmul is Quartet's FP4 fake-quantized one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 cfg: FP4LinearConfig | None = None) -> None:
        cfg = cfg or FP4LinearConfig()
        if in_features % cfg.block():
            raise ConfigError(
                f"model.linear: fp4 ({cfg.format}, hadamard={cfg.hadamard}) needs every"
                f" projection's input width to be a multiple of {cfg.block()}; a projection has"
                f" in_features={in_features} (change the model's widths or the linear type)"
            )
        super().__init__(in_features, out_features, cfg=cfg, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            y = fp4_linear(x.to(dtype), self.weight.to(dtype), fmt=self.cfg.format,
                           hadamard=self.cfg.hadamard, backward=self.cfg.backward)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

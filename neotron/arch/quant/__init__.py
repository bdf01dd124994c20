"""Quantization-aware linear layers: `bitnet` (1.58-bit BitLinear) and `fp4` (Quartet-style
MXFP4 / NVFP4 fake-quant). Chosen by `model.linear.type`; the embeddings and the LM head stay
dense. The quantizers are in neotron.kernels.quant; the math and the departures from the
references are in docs/quantization.md."""

from __future__ import annotations

from neotron.arch.quant.bitlinear import (
    BitLinear,
    BitLinearConfig,
    ramp_lambda,
    set_quant_step,
)
from neotron.arch.quant.fp4 import FP4Linear, FP4LinearConfig

__all__ = [
    "BitLinear",
    "BitLinearConfig",
    "FP4Linear",
    "FP4LinearConfig",
    "ramp_lambda",
    "set_quant_step",
]

"""Quantizers for quantization-aware training (BitNet 1.58-bit, MXFP4 / NVFP4 fake-quant).

`reference.py` holds the readable PyTorch quantizers and the Quartet FP4 linear; it is the path
every device runs today. A fused Triton Hadamard + quantize kernel (the simulation's throughput
bottleneck on Hopper, which has no FP4 tensor cores) joins as another file here, tested against
the reference and picked by the same names.
"""

from __future__ import annotations

from neotron.kernels.quant.reference import (
    E2M1_VALUES,
    GROUP_SIZE,
    absmean_scale,
    blend,
    fp4_linear,
    fp4_quantize,
    hadamard_matrix,
    quantize_activation_int8,
    quantize_weight_ternary,
    random_hadamard,
    rotate,
    round_to_e2m1,
    ste,
    stochastic_round_to_e2m1,
    ternary_codes,
)

__all__ = [
    "E2M1_VALUES",
    "GROUP_SIZE",
    "absmean_scale",
    "blend",
    "fp4_linear",
    "fp4_quantize",
    "hadamard_matrix",
    "quantize_activation_int8",
    "quantize_weight_ternary",
    "random_hadamard",
    "rotate",
    "round_to_e2m1",
    "ste",
    "stochastic_round_to_e2m1",
    "ternary_codes",
]

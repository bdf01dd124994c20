"""BitLinear: 1.58-bit (ternary) weights and 8-bit activations, trained with a straight-through
estimator; registered as linear type `bitnet`.

- BitNet b1.58: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
  arXiv 2402.17764, and the training FAQ's quantizers (as torchao's `test_bitnet_training`
  transcribes them).
- Extra RMSNorm: Steinmetz et al., "An Extra RMSNorm is All You Need for Fine Tuning to 1.58
  Bits", arXiv 2505.08823: an RMSNorm before every quantized projection, and a gradual
  (optionally layer-wise) schedule to fine-tune a full-precision checkpoint into a ternary one.
- The gradual form W + lam (W_q - W), lam: 0 -> 1, as in the Hugging Face blog "Fine-tuning
  LLMs to 1.58bit" (huggingface.co/blog/1_58_llm_extreme_quantization).

Per projection, with x [..., in] and W [out, in] (quantizers in neotron.kernels.quant):

    x  = RMSNorm(x)                                         (input_norm: the extra RMSNorm)
    W~ = W + lam (clamp(round(W / s_w), -1, 1) s_w - W),     s_w = mean|W| over the whole W
    x~ = x + lam (clamp(round(x s_x), -128, 127) / s_x - x), s_x = 127 / max|x| per token
    y  = x~ W~^T                       gradients reach W and x straight through (identity)

lam = 1 is the ternary model (the default); `set_quant_step` (called by the trainer every step)
moves lam from 0 to 1 over `ramp_steps`, for all layers at once or layer after layer in depth
order. lam is a buffer (not saved in checkpoints): it is a pure function of the step.

Under FSDP2 the forward sees the all-gathered weight, and on a tensor-parallel DTensor shard
`mean|W|` is a full reduction: either way s_w is the whole weight's. Tensor parallelism of the
layer itself is not offered (the extra norm's weight has no plan): `parallel.tp > 1` is refused.
"""

from __future__ import annotations

import re
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.linear import DenseLinear
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import LINEARS, LayerConfig
from neotron.kernels.quant import blend, quantize_activation_int8, quantize_weight_ternary, ste


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or fp64 if it is fp64."""
    return x if x.dtype == torch.float64 else x.float()


class BitLinearConfig(LayerConfig):
    type: Literal["bitnet"] = "bitnet"
    input_norm: bool = Field(
        default=True,
        description="extra RMSNorm on the projection's input before quantization (Steinmetz et"
        " al. 2025); False = the bare quantized projection (torchao's bitnet_training)",
    )
    norm_eps: float = Field(default=1e-5, gt=0, description="eps of the extra RMSNorm")
    quantize_activations: bool = Field(
        default=True, description="per-token absmax 8-bit activations; False = ternary weights only"
    )
    ramp_steps: int = Field(
        default=0, ge=0,
        description="gradual quantization: lam goes 0 (full precision) -> 1 (ternary) over this"
        " many optimizer steps; 0 = ternary from the first step",
    )
    ramp: Literal["global", "layerwise"] = Field(
        default="global",
        description="global = every projection follows one lam; layerwise = layer i ramps in its"
        " own window [i, i+1) * ramp_steps / n_layers, first layer first",
    )


@LINEARS.register(BitLinearConfig)
class BitLinear(DenseLinear):
    """`BitLinear(in_features, out_features, bias=False, input_norm=True)`; `cfg` (the YAML
    config) sets the other knobs, and `input_norm`, when given, overrides its value.

    FLOPs are DenseLinear's (the matmul's forward + backward): the quantizers and the extra
    norm are O(in + out) per token and not counted, so MFU stays the useful matmul work over the
    bf16 peak (the matmuls do run in bf16/fp32; nothing here is int8 or 2-bit)."""

    # The extra norm is new in a model fine-tuned from a dense checkpoint: `train.init_from`
    # keeps its fresh init (ones) when the source has no such tensor.
    _neotron_init_from_optional = ("norm.weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_norm: bool | None = None, *, cfg: BitLinearConfig | None = None) -> None:
        cfg = cfg or BitLinearConfig()
        if input_norm is not None and input_norm != cfg.input_norm:
            cfg = cfg.model_copy(update={"input_norm": input_norm})
        super().__init__(in_features, out_features, cfg=cfg, bias=bias)
        self.norm = RMSNorm(in_features, cfg.norm_eps) if cfg.input_norm else None
        self.register_buffer("quant_lambda", torch.ones(()), persistent=False)
        self._lambda_value = 1.0  # host copy of quant_lambda: set_quant_step writes on change only
        # True when `weight` already holds ternary codes * scale (a loaded ternary export):
        # the forward then uses it as is instead of quantizing it again.
        self.prequantized = False

    def init_weights(self, std: float) -> None:
        super().init_weights(std)  # DenseLinear's: truncated normal weight, zero bias
        if self.norm is not None:
            self.norm.init_weights()
        self.set_lambda(1.0)

    def set_lambda(self, lam: float) -> None:
        with torch.no_grad():
            self.quant_lambda.fill_(lam)
        self._lambda_value = lam

    def quantized_weight(self) -> torch.Tensor:
        """W~ at the current lam (W_q itself at lam = 1), straight-through to `weight`."""
        w = self.weight
        if self.prequantized:
            return w
        with torch.no_grad():
            wq = quantize_weight_ternary(_wide(w.detach())).to(w.dtype)
        return self._mix(w, wq)

    def _mix(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        # The host copy of lam picks the cheap forms at the ends of the ramp (no device sync).
        # Under torch.compile the buffer form is used throughout: a guard on a changing Python
        # float would recompile at every step of the ramp. Both forms give the same values.
        if not torch.compiler.is_compiling():
            if self._lambda_value >= 1:
                return ste(x, xq)
            if self._lambda_value <= 0:
                return x
        return blend(x, xq, self.quant_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:  # RMSNorm in fp32 (fp64 kept: tests compare in fp64)
            n = self.norm
            x = F.rms_norm(_wide(x), (x.shape[-1],), _wide(n.weight), n.eps).to(x.dtype)
        if self.cfg.quantize_activations:
            with torch.no_grad():
                xq = quantize_activation_int8(x.detach())
            x = self._mix(x, xq)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, input_norm={self.norm is not None},"
                f" ramp_steps={self.cfg.ramp_steps}")


# ------------------------------------------------------------------ gradual schedule


def ramp_lambda(step: int, ramp_steps: int, ramp: str = "global", layer: int = 0,
                n_layers: int = 1) -> float:
    """lam at the start of optimizer step `step` (0-based): 0 -> 1 linearly over ramp_steps,
    globally or in layer `layer`'s window of ramp_steps / n_layers steps."""
    if ramp_steps <= 0:
        return 1.0
    if ramp == "global":
        return min(1.0, step / ramp_steps)
    width = ramp_steps / n_layers
    return min(1.0, max(0.0, (step - layer * width) / width))


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SCHEDULED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scheduled_layers(model: nn.Module) -> list[tuple[BitLinear, int, int]]:
    """(module, layer index, n_layers) for every BitLinear with a ramp, cached per model."""
    cached = _SCHEDULED.get(model)
    if cached is None:
        found = []
        for name, module in model.named_modules():
            if isinstance(module, BitLinear) and module.cfg.ramp_steps > 0:
                m = _LAYER_RE.search(name)
                found.append((module, int(m.group(1)) if m else 0))
        n_layers = 1 + max((i for _, i in found), default=0)
        cached = [(module, i, n_layers) for module, i in found]
        _SCHEDULED[model] = cached
    return cached


def set_quant_step(model: nn.Module, step: int) -> None:
    """Set every scheduled BitLinear's lam for optimizer step `step` (the trainer calls this at
    the start of each step; a model without a ramp makes it a no-op)."""
    for module, layer, n_layers in _scheduled_layers(model):
        lam = ramp_lambda(step, module.cfg.ramp_steps, module.cfg.ramp, layer, n_layers)
        if lam != module._lambda_value:
            module.set_lambda(lam)

"""Single-device model code. No torch.distributed in here (DESIGN.md)."""

from __future__ import annotations

from neotron.arch.config import BlockConfig, ModelConfig
from neotron.arch.model import CausalLM, build_model, materialize
from neotron.arch.registry import FFNS, LINEARS, MIXERS

__all__ = [
    "BlockConfig",
    "CausalLM",
    "FFNS",
    "LINEARS",
    "MIXERS",
    "ModelConfig",
    "build_model",
    "materialize",
]

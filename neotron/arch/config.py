"""The `model:` section of a run config.

Layer configs are pydantic discriminated unions over whatever is registered, so every layer
module must be imported before the unions are built: add a new block's module to the import
list below.
"""

from __future__ import annotations

from pydantic import Field, model_validator

# Imported for their registrations (the registry decorators run at import).
from neotron.arch import (  # noqa: F401
    attention,
    deltanet,
    linear,
    lora,
    memory,
    memoryformer,
    mlp,
    quant,
    tokenformer,
    ttt,
    ultramem,
)
from neotron.arch.attention import AttentionConfig
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.mlp import SwiGLUConfig
from neotron.arch.registry import FFNS, LINEARS, MIXERS
from neotron.arch.stack import RecursionConfig
from neotron.strict import StrictModel

MixerConfig = MIXERS.config_union()
FFNConfig = FFNS.config_union()
LinearConfig = LINEARS.config_union()


class BlockConfig(StrictModel):
    mixer: MixerConfig = Field(default_factory=AttentionConfig)
    ffn: FFNConfig = Field(default_factory=SwiGLUConfig)


class ModelConfig(StrictModel):
    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    max_seq_len: int = Field(default=4096, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(default=0.02, gt=0)
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="dropout on each residual branch (mixer and FFN outputs) while training;"
        " 0 (the pretraining default) draws no random numbers",
    )
    linear: LinearConfig = Field(
        default_factory=DenseLinearConfig,
        description="projection type of every block (embeddings and LM head stay dense)",
    )
    linear_exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns of projections that stay dense whatever `linear` says,"
        " named as in the state_dict: e.g. ['layers.*.mixer.wo'] (one projection in every"
        " layer), ['layers.0.*', 'layers.11.*'] (the first and last blocks)",
    )
    blocks: dict[str, BlockConfig] = Field(default_factory=lambda: {"attention": BlockConfig()})
    pattern: list[str] | None = Field(
        default=None,
        description="block names repeated over depth; None = the only block of `blocks`"
        " (the only one not placed by `block_at`)",
    )
    recursion: RecursionConfig | None = Field(
        default=None,
        description="one shared stack of n_layers blocks looped `loops` times, optionally"
        " relaxed by per-loop LoRA (neotron/arch/stack.py, docs/recursion.md)",
    )
    block_at: dict[str, list[int]] = Field(
        default_factory=dict,
        description="block name -> 0-based layers that use it instead of the pattern's block,"
        " e.g. {memory: [4, 12, 20]}",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.blocks:
            raise ValueError("@blocks: at least one block must be defined")
        placed: dict[int, str] = {}
        for name, layers in self.block_at.items():
            if name not in self.blocks:
                raise ValueError(
                    f"@block_at.{name}: unknown block '{name}' (defined: {', '.join(self.blocks)})"
                )
            for i in layers:
                if not 0 <= i < self.n_layers:
                    raise ValueError(f"@block_at.{name}: layer {i} is not in [0, {self.n_layers})")
                if i in placed and placed[i] != name:
                    raise ValueError(f"@block_at.{name}: layer {i} is also given to '{placed[i]}'")
                placed[i] = name
        if self.pattern is None and len(self._unplaced_blocks()) != 1:
            raise ValueError(
                f"@pattern: required when several blocks are defined ({', '.join(self.blocks)})"
            )
        for i, name in enumerate(self.pattern or []):
            if name not in self.blocks:
                raise ValueError(
                    f"@pattern.{i}: unknown block '{name}' (defined: {', '.join(self.blocks)})"
                )
        if self.pattern == []:
            raise ValueError("@pattern: must not be empty")
        for name, block in self.blocks.items():
            for part in ("mixer", "ffn"):
                for key, msg in getattr(block, part).check(self.dim):
                    raise ValueError(f"@blocks.{name}.{part}.{key}: {msg}")
        return self

    def _unplaced_blocks(self) -> list[str]:
        return [b for b in self.blocks if b not in self.block_at] or list(self.blocks)

    def layer_blocks(self) -> list[str]:
        """The block name of every layer: the pattern repeated over depth, then `block_at`."""
        pattern = self.pattern or self._unplaced_blocks()
        names = [pattern[i % len(pattern)] for i in range(self.n_layers)]
        for name, layers in self.block_at.items():
            for i in layers:
                names[i] = name
        return names

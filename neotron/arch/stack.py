"""The layer stack: the blocks of `blocks`/`pattern`/`block_at`, and recursion over them.

Recursion (`model.recursion`), after Bae et al., "Relaxed Recursive Transformers", ICLR 2025,
arXiv 2410.20672, CYCLE sharing: the n_layers blocks are one stack of unique parameters,
applied `loops` = K times, so layer l (0-based, of the effective depth n_layers K) is block
l mod n_layers:

    h_0 = embed(tokens)
    for k in 0..K-1:  for i in 0..L-1:  h <- Block_i(h; loop k)          (L = n_layers)

Parameters are stored once, in `model.layers` (L blocks: the units of activation
checkpointing, torch.compile and FSDP2 in train/parallel.py, which therefore shard the shared
stack once); autograd sums a shared weight's gradient over its K uses. `flops_per_token` counts
every loop.

With `recursion.lora` each block is a `LoopBlock`: its target projections get one LoRA per
loop (neotron/arch/lora.py; W_eff at layer k L + i = W'_i + (alpha / r) B_{k,i} A_{k,i}). The
loop index travels with the block's input, in `LoopSeq` (a SeqInfo with `loop`), so a block
recomputed by activation checkpointing replays the loop of its forward.

Depth-scaled initialization (the residual output projections' out_std) uses the effective
depth n_layers K by default (`init_depth`): the residual stream sums n_layers K branch outputs.
Every block sees `BuildContext.n_layers` = that depth; layer-index-dependent choices
(UltraMemV2's pool offset) keep their unique layer index i < n_layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from neotron.arch.block import Block
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinear
from neotron.arch.lora import DepthLoRA, DepthNorm, LoRAConfig, MoLFFN, clear_aux, lora_targets
from neotron.errors import ConfigError
from neotron.strict import StrictModel

if TYPE_CHECKING:
    from neotron.arch.config import ModelConfig


class RecursionConfig(StrictModel):
    loops: int = Field(default=1, ge=1,
                       description="K: the n_layers stack is applied K times (CYCLE sharing)")
    lora: LoRAConfig | None = Field(
        default=None, description="relaxed recursion: per-loop LoRA on the shared projections")
    init_depth: Literal["effective", "stack"] = Field(
        default="effective",
        description="the depth of depth-scaled init (out_std, TokenFormer's wang init):"
        " effective = n_layers * loops (default), stack = n_layers")


@dataclass
class LoopSeq(SeqInfo):
    """SeqInfo plus the loop the stack is in (what per-loop LoRA selects by), as a 1-element
    int64 tensor: torch.compile then traces one graph for all loops, not one per value."""

    loop: torch.Tensor | int = 0


def at_loop(seq: SeqInfo, k: torch.Tensor) -> LoopSeq:
    out = LoopSeq(positions=seq.positions, doc_ids=seq.doc_ids, loop=k)
    if "cu_seqlens" in seq.__dict__:  # computed once per forward, not once per loop
        out.__dict__["cu_seqlens"] = seq.__dict__["cu_seqlens"]
    return out


class LoopBlock(Block):
    """A shared block with per-loop LoRA on its target projections (and, optionally, per-loop
    pre-norm gains)."""

    def __init__(self, ctx: BuildContext, block_cfg, dropout: float, lora: LoRAConfig,
                 loops: int) -> None:
        super().__init__(ctx, block_cfg, dropout=dropout)
        self.lora = DepthLoRA(self, lora, loops)
        if lora.per_depth_norms:
            self.mixer_norm = DepthNorm(loops, ctx.dim, ctx.norm_eps, self.lora)
            self.ffn_norm = DepthNorm(loops, ctx.dim, ctx.norm_eps, self.lora)

    def init_weights(self) -> None:
        super().init_weights()
        self.lora.init_weights()

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        self.lora.depth = getattr(seq, "loop", 0)
        return super().forward(x, seq)

    def prefill(self, x: torch.Tensor, seq: SeqInfo) -> tuple[torch.Tensor, object]:
        self.lora.depth = getattr(seq, "loop", 0)
        return super().prefill(x, seq)

    def step(self, x_t: torch.Tensor, state: object, seq: SeqInfo) -> tuple[torch.Tensor, object]:
        self.lora.depth = getattr(seq, "loop", 0)
        return super().step(x_t, state, seq)

    def flops_per_token(self, seq_len: int) -> float:
        return super().flops_per_token(seq_len) + self.lora.flops_per_token()


def recursion_of(cfg: ModelConfig) -> RecursionConfig:
    return cfg.recursion if cfg.recursion is not None else RecursionConfig()


def build_layers(cfg: ModelConfig) -> nn.ModuleList:
    """The unique blocks of the stack, in order (n_layers of them)."""
    rec = recursion_of(cfg)
    depth = cfg.n_layers * rec.loops if rec.init_depth == "effective" else cfg.n_layers
    layers = nn.ModuleList()
    for i, name in enumerate(cfg.layer_blocks()):
        ctx = BuildContext(dim=cfg.dim, layer_idx=i, n_layers=depth, linear=cfg.linear,
                           norm_eps=cfg.norm_eps, init_std=cfg.init_std,
                           linear_exclude=tuple(cfg.linear_exclude))
        if rec.lora is None:
            layers.append(Block(ctx, cfg.blocks[name], dropout=cfg.dropout))
        else:
            layers.append(LoopBlock(ctx, cfg.blocks[name], cfg.dropout, rec.lora, rec.loops))
    for i, pat in enumerate(cfg.linear_exclude):
        names = (f"layers.{n}" for n, m in layers.named_modules() if type(m) is DenseLinear)
        if not any(fnmatchcase(n, pat) for n in names):
            raise ConfigError(f"model.linear_exclude.{i}: '{pat}' matches no projection (names"
                              " look like layers.0.mixer.wo)")
    if rec.lora is not None:
        for t in rec.lora.targets:
            if not any(lora_targets(layer, [t]) for layer in layers):
                raise ConfigError(f"model.recursion.lora.targets: '{t}' names no projection of"
                                  " any block (projections are named like wq, wo, w1)")
    return layers


EXITS_ATTR = "_neotron_loop_exits"  # on model.layers: True inside `loop_exits`


def run_stack(layers: nn.ModuleList, h: torch.Tensor, seq: SeqInfo,
              cfg: ModelConfig) -> torch.Tensor:
    """h through the stack, `loops` times (the seq of each loop says which). Inside
    `loop_exits`, the residual stream after every loop, concatenated along the batch."""
    rec = recursion_of(cfg)
    if any(b.ffn.type == "mol" for b in cfg.blocks.values()):
        clear_aux(layers)  # statistics of a forward nobody collected
    loop_ids = torch.arange(rec.loops, device=h.device)[:, None] if rec.lora is not None else None
    exits: list[torch.Tensor] | None = [] if getattr(layers, EXITS_ATTR, False) else None
    for k in range(rec.loops):
        seq_k = at_loop(seq, loop_ids[k]) if loop_ids is not None else seq
        for layer in layers:
            h = layer(h, seq_k)
        if exits is not None:
            exits.append(h)
    return torch.cat(exits) if exits is not None else h


@contextmanager
def loop_exits(model: nn.Module) -> Iterator[int]:
    """Early exits: inside, `model(tokens [B, T])` returns the logits of every loop's exit,
    [K B, T, vocab], exit k (1-based) in rows (k-1) B .. k B - 1, each the model's own final
    norm and head applied to the residual stream after loop k. Yields K.

    The exits ride on the batch dimension through the model's own forward, so the head and
    norm run under whatever wraps the model (FSDP2's hooks, autocast) unchanged; the price is
    K times the logits' memory."""
    layers = model.layers
    setattr(layers, EXITS_ATTR, True)
    try:
        yield recursion_of(model.cfg).loops
    finally:
        setattr(layers, EXITS_ATTR, False)


def stack_flops(layers: nn.ModuleList, seq_len: int, cfg: ModelConfig) -> float:
    return recursion_of(cfg).loops * sum(layer.flops_per_token(seq_len) for layer in layers)


def param_summary(model: nn.Module) -> str | None:
    """One line for recursive / MoL models: unique parameters by kind and the effective
    depth; None for a plain stack."""
    cfg = model.cfg
    rec = recursion_of(cfg)
    mol = [m for m in model.modules() if isinstance(m, MoLFFN)]
    if rec.loops == 1 and rec.lora is None and not mol:
        return None
    total = sum(p.numel() for p in model.parameters())
    lora = sum(p.numel() for m in model.modules() if isinstance(m, DepthLoRA)
               for p in m.parameters())
    experts = sum(p.numel() for m in mol for p in (*m.experts.parameters(), m.router))
    shared = sum(p.numel() for p in model.layers.parameters()) - lora
    parts = [f"{shared / 1e6:.2f}M in the shared stack (MoL experts and router: "
             f"{experts / 1e6:.3f}M)" if mol else f"{shared / 1e6:.2f}M in the shared stack"]
    if lora:
        parts.append(f"{lora / 1e6:.3f}M per-loop LoRA")
    what = "recursion" if rec.loops > 1 else "stack"
    return (f"{what}: {total / 1e6:.2f}M unique parameters ({', '.join(parts)}); effective"
            f" depth {cfg.n_layers * rec.loops} = {cfg.n_layers} layers x {rec.loops} loops")

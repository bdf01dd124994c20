"""Cached (incremental) decoding: the prompt once in the parallel form, then one token at a
time against a per-layer state.

    logits, state = prefill(model, tokens)        # tokens [B, T]: logits [B, T, vocab]
    logits, state = step(model, next_ids, state)  # next_ids [B]:  logits [B, vocab]

What each mixer keeps (its `prefill` / `step` methods):
- attention (and MemoryFormer attention): a KV cache of the rotated keys and the values,
  kv heads unrepeated (GQA); the new token's RoPE position is the cache length;
- DeltaNet / Gated DeltaNet: the delta-rule memory S from the chunked kernel's final state,
  and the last conv_size-1 inputs of each short convolution;
- TTT-Linear / TTT-MLP: the inner weights after the prompt's whole mini-batches (dual-form
  kernel), then the last T mod b tokens stepped (a mini-batch in progress is a running sum).
Every FFN (SwiGLU, product-key memory, UltraMem, MoL, Pattention, MemoryFormer) is per-token
and keeps nothing. With `model.recursion` the state is one entry per (loop, layer): the shared
blocks are applied `loops` times, each application with its own cache (and its loop's LoRA).

One document per row: the rows of a batch are prompts of equal length (no padding here).
Decoding runs the model as in eval mode: dropout is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neotron.arch.context import SeqInfo
from neotron.arch.lora import clear_aux
from neotron.arch.stack import at_loop, recursion_of
from neotron.errors import UsageError


@dataclass
class DecodeState:
    """layers[k * n_layers + i]: the state of block i in loop k; length: tokens consumed
    (the position of the next token)."""

    layers: list[Any]
    length: int


def check_decodable(model: nn.Module) -> None:
    """UsageError naming the first mixer without cached decoding (`prefill` and `step`)."""
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        if not (hasattr(mixer, "prefill") and hasattr(mixer, "step")):
            kind = getattr(getattr(mixer, "cfg", None), "type", type(mixer).__name__)
            raise UsageError(f"cached decoding does not support the '{kind}' mixer"
                             f" (model layer {i})")


def _loop_seqs(model: nn.Module, seq: SeqInfo) -> list[SeqInfo]:
    """The SeqInfo of each loop (carrying the loop index when per-loop LoRA selects by it)."""
    rec = recursion_of(model.cfg)
    if rec.lora is None:
        return [seq] * rec.loops
    ids = torch.arange(rec.loops, device=seq.positions.device)[:, None]
    return [at_loop(seq, ids[k]) for k in range(rec.loops)]


def prefill(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
    """tokens [B, T] (T >= 1) -> (logits [B, T, vocab], the state after them)."""
    check_decodable(model)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise UsageError(f"prefill needs token ids [batch, length >= 1], got {tuple(tokens.shape)}")
    clear_aux(model.layers)
    seq = SeqInfo.for_tokens(tokens)
    h = model.embed(tokens)
    states = []
    for seq_k in _loop_seqs(model, seq):
        for layer in model.layers:
            h, s = layer.prefill(h, seq_k)
            states.append(s)
    return model.logits(h), DecodeState(states, tokens.shape[1])


def step(model: nn.Module, tokens: torch.Tensor, state: DecodeState
         ) -> tuple[torch.Tensor, DecodeState]:
    """The next token of each row, tokens [B] -> (logits [B, vocab], the state after it)."""
    clear_aux(model.layers)
    seq = SeqInfo(positions=torch.tensor([state.length], device=tokens.device))
    h = model.embed(tokens)
    states = iter(state.layers)
    new = []
    for seq_k in _loop_seqs(model, seq):
        for layer in model.layers:
            h, s = layer.step(h, next(states), seq_k)
            new.append(s)
    return model.logits(h), DecodeState(new, state.length + 1)

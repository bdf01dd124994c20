"""Parameter and FLOP accounting: what a scaling study puts on its axes.

The convention (docs/accounting.md has it in full, with measured ratios per demo config):
- FLOPs are training FLOPs per token, forward + backward, a multiply-add = 2 FLOPs, matmul-like
  work only (elementwise work, norms, softmax, top-k and gathers are free): what
  `model.flops_per_token(seq_len)` returns, summed from every module's own `flops_per_token`
  and checked against torch's FlopCounterMode in tests/test_flops_measured.py.
- Parameters are counted once each however many layers share them (shared value tables,
  recursion loops). `active` counts what one token's output depends on: a sparse table
  (memory values, hash tables) contributes the rows a token reads, routed experts the share a
  token is routed to, as the module reports through `active_params()`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unique parameters stored
    active: int  # parameters one token touches (sparse tables count only the rows it reads)
    embedding: int  # token embedding, plus the LM head when it is untied
    non_embedding: int  # total - embedding


def _unique(params) -> dict[int, nn.Parameter]:
    return {id(p): p for p in params}


def param_counts(model: nn.Module) -> ParamCounts:
    """Total / active / embedding / non-embedding parameter counts of a CausalLM."""
    params = _unique(model.parameters())
    total = sum(p.numel() for p in params.values())
    emb = _unique([model.embed.weight] + ([model.head.weight] if model.head is not None else []))
    embedding = sum(p.numel() for p in emb.values())
    # A module whose token uses only part of some parameters (sparse tables, routed experts)
    # says how much, per token: `active_params()` -> {parameter name, relative to the module
    # (dotted for a submodule's): count}. Several layers reading one shared table add up,
    # up to the table's size.
    touched: dict[int, float] = {}
    for mod in model.modules():
        own = getattr(mod, "active_params", None)
        if not callable(own):
            continue
        for name, count in own().items():
            p = mod.get_parameter(name)
            touched[id(p)] = touched.get(id(p), 0.0) + count
    active = sum(min(p.numel(), round(touched[i])) if i in touched else p.numel()
                 for i, p in params.items())
    return ParamCounts(total=total, active=int(active), embedding=embedding,
                       non_embedding=total - embedding)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`: the model's own count."""
    return float(model.flops_per_token(seq_len))

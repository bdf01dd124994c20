"""Optimizer construction: which parameter goes to which optimizer, with which settings.

Every parameter lands in a named group; groups carry `base_lr`, and the trainer sets
`lr = base_lr * schedule(step)` on each group before each step. The Muon family (its own
issue) plugs in here as more groups routed by `route`.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from neotron.config import OptimConfig


def route(name: str, param: nn.Parameter, model: nn.Module) -> str:
    """The group a parameter belongs to.

    - "decay": hidden weight matrices (2-D and larger), with weight decay;
    - "no_decay": embeddings, norms, biases, scalars: decaying them only hurts (they are
      not scale-invariant the way a matrix followed by a norm is).
    A parameter may carry an explicit `_neotron_group` attribute set by its block.
    """
    tag = getattr(param, "_neotron_group", None)
    if tag is not None:
        return tag
    if param.ndim < 2 or name.endswith("embed.weight"):
        return "no_decay"
    return "decay"


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(route(name, p, model), []).append((name, p))
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model)
    torch_groups = []
    for gname in sorted(groups):
        wd = cfg.weight_decay if gname == "decay" else 0.0
        torch_groups.append(
            {
                "params": [p for _, p in groups[gname]],
                "name": gname,
                "base_lr": cfg.lr,
                "lr": cfg.lr,
                "weight_decay": wd,
            }
        )
    # foreach=False keeps the update order and arithmetic identical however the parameters
    # are laid out, which bitwise resume relies on; the fused/foreach paths are for GPUs.
    use_foreach = any(p.is_cuda for g in torch_groups for p in g["params"])
    return torch.optim.AdamW(
        torch_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=use_foreach
    )


def routing_table(model: nn.Module) -> str:
    """A human-readable table: group -> parameter count, tensor count, example names."""
    groups = param_groups(model)
    lines = [f"{'group':<10} {'tensors':>8} {'params':>12}  examples"]
    for gname in sorted(groups):
        members = groups[gname]
        n = sum(p.numel() for _, p in members)
        shapes = Counter(name.split(".")[-2] if "." in name else name for name, _ in members)
        examples = ", ".join(k for k, _ in shapes.most_common(4))
        lines.append(f"{gname:<10} {len(members):>8} {n:>12,}  {examples}")
    return "\n".join(lines)

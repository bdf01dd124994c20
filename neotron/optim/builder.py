"""Optimizer construction: one optimizer object for the whole model.

Every parameter lands in a named group (its routing role, :mod:`neotron.optim.routing`);
groups carry ``base_lr``, and the trainer sets ``lr = base_lr * schedule(step)`` on each group
before each step, so every group follows the same schedule from its own peak lr.

- ``optim.name=adamw``: ``torch.optim.AdamW`` over all groups.
- ``optim.name=muon|normuon``: one :class:`~neotron.optim.muon.Muon` /
  :class:`~neotron.optim.normuon.NorMuon` whose ``matrix`` group is orthogonalized and whose
  other groups are ``"algorithm": "adamw"`` groups stepped by torch's AdamW code. One object,
  so ``get_state_dict(model, optimizer)`` / DCP checkpoint and reshard it like AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neotron.config import OptimConfig
from neotron.optim.muon import Muon
from neotron.optim.normuon import NorMuon
from neotron.optim.routing import (
    param_groups,
    plan_groups,
    remember_config,
    route,
    routing_table,
)

__all__ = ["build_optimizer", "param_groups", "route", "routing_table"]


def _data_parallel_group(model: nn.Module) -> Any:
    """DDP's process group when ``model`` is wrapped in DistributedDataParallel."""
    if type(model).__name__ == "DistributedDataParallel":
        return getattr(model, "process_group", None)
    return None


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, process_group: Any = None, comm_batch: int = 4
) -> torch.optim.Optimizer:
    """The optimizer for ``model`` under ``cfg``; works on meta, plain, DDP and FSDP2 models.

    Args:
        process_group: for Muon/NorMuon, the group over which *plain-tensor* parameters are
            replicated (DDP); taken from a ``DistributedDataParallel`` wrapper when not given.
            FSDP2 (DTensor) parameters carry their own mesh and need nothing.
        comm_batch: Muon/NorMuon matrices per owner rank per communication round.
    """
    plans = plan_groups(model, cfg)
    remember_config(model, cfg)
    groups: list[dict[str, Any]] = []
    for plan in plans:
        group: dict[str, Any] = {
            "params": [p for _, p in plan.params],
            "name": plan.name,
            "base_lr": plan.lr,
            "lr": plan.lr,
            "weight_decay": plan.weight_decay,
        }
        if plan.lr_ramp is not None:
            group["lr_ramp"] = plan.lr_ramp  # the trainer scales lr by schedules.ramp_factor
        if cfg.name != "adamw":
            group["algorithm"] = plan.algorithm
            if plan.algorithm == "adamw":
                group.update(betas=tuple(cfg.betas), eps=cfg.eps)
        groups.append(group)
    if cfg.name == "adamw":
        # foreach=False keeps the update order and arithmetic identical however the parameters
        # are laid out, which bitwise resume relies on; the fused/foreach paths are for GPUs.
        use_foreach = any(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=use_foreach
        )
    cls = Muon if cfg.name == "muon" else NorMuon
    kwargs: dict[str, Any] = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr=cfg.adjust_lr,
        adamw_betas=tuple(cfg.betas),
        adamw_eps=cfg.eps,
        process_group=process_group if process_group is not None else _data_parallel_group(model),
        comm_batch=comm_batch,
    )
    if cls is NorMuon:
        kwargs["beta2"] = cfg.beta2
    return cls(groups, **kwargs)

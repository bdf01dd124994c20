"""The process environment and the parallelize step.

`parallelize` is the one place where distributed wrappers touch the model (DESIGN.md: model
code is single-device). In a single process it only moves nothing and returns the model; the
distributed-engine issue adds, in this order, tensor-parallel plans, activation
checkpointing, torch.compile and FSDP2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def setup_env(device_choice: str) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_choice)
    if world > 1:
        raise NotImplementedError(
            "multi-process training (WORLD_SIZE > 1) is not available yet: the distributed"
            " engine (FSDP2 / tensor parallel) is tracked in its own issue"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def parallelize(model: nn.Module, env: DistEnv) -> nn.Module:
    """Apply the parallelism the config asks for; a single process needs none."""
    return model

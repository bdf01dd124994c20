"""The process environment, the device mesh, and the parallelize step.

`parallelize` is the one place where distributed wrappers touch the model (DESIGN.md: model
code is single-device). It applies, in this order (the order torchtitan's `parallelize.py` and
OLMo-core use, written here from the PyTorch docs):

1. tensor-parallel plans (`neotron/arch/tp_plans.py`) on the `tp` sub-mesh;
2. activation checkpointing of every block (`train.activation_checkpointing`);
3. `torch.compile` of every block's forward (`train.compile`);
4. FSDP2 `fully_shard` of every block, then of the root, on the data-parallel sub-mesh
   (HSDP when `parallel.dp_replicate > 1`), with a `MixedPrecisionPolicy` (bf16 parameters and
   fp32 gradient reduction when the run's precision is bf16; plain fp32 otherwise).

A single process (WORLD_SIZE 1) gets no process group and no wrappers besides 2 and 3, so the
single-process path is the plain model the bit-exact resume tests run.

The mesh has three named dimensions, ("dp_replicate", "dp_shard", "tp"), of sizes resolved from
`parallel:` (one of them may be -1, "the rest of the world"). Data-parallel rank and world
(what the data loader slices by) are the coordinates over (dp_replicate, dp_shard); all ranks of
one tp group see the same batch.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from neotron.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.tp)


def resolve_dims(parallel_cfg: Any, world: int) -> ParallelDims:
    """Sizes of the mesh for `world` processes; -1 takes what the others leave."""
    sizes = {k: getattr(parallel_cfg, k) for k in MESH_DIMS}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    auto = [k for k, v in sizes.items() if v == -1]
    if auto:
        if world % fixed:
            raise ConfigError(
                f"parallel: the world size {world} is not divisible by the fixed degrees"
                f" ({', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)}), so"
                f" parallel.{auto[0]}=-1 cannot be resolved"
            )
        sizes[auto[0]] = world // fixed
    dims = ParallelDims(**sizes)
    if dims.world != world:
        raise ConfigError(
            f"parallel: dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard} x"
            f" tp={dims.tp} = {dims.world}, but {world} processes were launched (WORLD_SIZE);"
            " make the degrees multiply to the world size, or set one of them to -1"
        )
    return dims


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dims: ParallelDims = field(default_factory=ParallelDims)
    mesh: Any = None  # DeviceMesh when distributed
    dp_rank: int = 0
    # "bf16" / "fp32": what the run computes in (train.precision resolved for the device)
    precision: str = "fp32"
    ckpt_group: Any = None  # a gloo process group for asynchronous checkpoint writes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_world(self) -> int:
        return self.dims.dp

    @property
    def fsdp(self) -> bool:
        """FSDP2 wraps the model (any data parallelism across processes)."""
        return self.distributed and self.dims.dp > 1

    @property
    def autocast(self) -> bool:
        """bf16 through torch.autocast; under FSDP the MixedPrecisionPolicy casts instead."""
        return self.precision == "bf16" and not self.fsdp


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return choice


def setup_env(cfg: Any, *, async_checkpoint: bool | None = None) -> DistEnv:
    """The process's place in the job, from the environment torchrun sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT). With WORLD_SIZE > 1 the default process group is created
    (NCCL on CUDA, gloo on CPU; timeout `parallel.timeout_s`) and the device mesh built."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    dims = resolve_dims(cfg.parallel, world)
    if dims.tp > 1:
        from neotron.arch.tp_plans import tp_config_errors

        errors = tp_config_errors(cfg.model, dims.tp)
        if errors:
            key, msg = errors[0]
            raise ConfigError(f"model.{key}: {msg}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return DistEnv(rank=rank, world_size=1, local_rank=local_rank, device=device,
                       dims=dims, precision=precision)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, timeout=timedelta(seconds=cfg.parallel.timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
        print("neotron: warning: torchrun --max-restarts with a rendezvous store shared with the"
              " workers: restarted workers can read the dead attempt's addresses and fail to"
              " connect (pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
              " before torchrun", file=sys.stderr, flush=True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=MESH_DIMS)
    coord = mesh.get_coordinate()
    dp_rank = coord[0] * dims.dp_shard + coord[1]
    use_async = cfg.checkpoint.async_ if async_checkpoint is None else async_checkpoint
    # Background checkpoint writes run collectives from another thread: they get their own
    # group (gloo: DCP's async save stages on the CPU), never the training group.
    ckpt_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.parallel.timeout_s)) \
        if use_async else None
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, dims=dims,
                   mesh=mesh, dp_rank=dp_rank, precision=precision, ckpt_group=ckpt_group)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------ parallelize


def parallelize(model: nn.Module, env: DistEnv, train_cfg: Any = None) -> nn.Module:
    """Apply TP -> activation checkpointing -> compile -> FSDP2 as the config asks."""
    if env.distributed and env.dims.tp > 1:
        apply_tp(model, env.mesh["tp"])
    if train_cfg is not None and train_cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, train_cfg.activation_checkpointing)
    if train_cfg is not None and train_cfg.compile:
        apply_compile(model)
    if env.fsdp:
        apply_fsdp(model, env)
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the units of activation checkpointing, compile and FSDP."""
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    from neotron.arch.tp_plans import plan_for, unplanned_parameters

    missing = unplanned_parameters(model)
    if missing:
        raise ConfigError(
            f"parallel.tp={tp_mesh.size()}: these modules hold parameters but no tensor-parallel"
            f" plan covers them: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''};"
            " register a plan in neotron/arch/tp_plans.py or use parallel.tp=1"
        )
    for _, module in list(model.named_modules()):
        plan = plan_for(module)
        if plan is None:
            continue
        styles = plan(module)
        own = styles.pop("", None)
        if styles:
            parallelize_module(module, tp_mesh, styles)
        if own is not None:
            parallelize_module(module, tp_mesh, own)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep the outputs of matmuls and attention (expensive to recompute, cheap per byte);
    recompute everything else (norms, RoPE, activations, residual adds)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's forward in backward. The block's `forward` is replaced on the
    instance (not wrapped in another module), so parameter names and checkpoints do not change
    with the setting."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    for block in blocks_of(model):
        inner = block.forward
        if mode == "selective":
            # a functools.partial: what torch.compile accepts as a checkpoint context_fn
            context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)

            def forward(*args: Any, _inner: Any = inner, _ctx: Any = context_fn,
                        **kwargs: Any) -> Any:
                return checkpoint(_inner, *args, use_reentrant=False, context_fn=_ctx, **kwargs)
        else:
            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward (instance attribute, names unchanged; FSDP2's hooks
    stay outside the compiled code). NEOTRON_COMPILE_BACKEND picks another backend (tests use
    aot_eager, which skips the C++ build)."""
    backend = os.environ.get("NEOTRON_COMPILE_BACKEND", "inductor")
    for block in blocks_of(model):
        block.forward = torch.compile(block.forward, backend=backend)


def apply_fsdp(model: nn.Module, env: DistEnv) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from neotron.arch.memory import shared_param_groups

    if env.dims.dp_replicate > 1:
        dp_mesh = env.mesh["dp_replicate", "dp_shard"]  # HSDP: shard within, replicate across
    else:
        dp_mesh = env.mesh["dp_shard"]
    mp = None
    if env.precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": dp_mesh, **({"mp_policy": mp} if mp is not None else {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        blocks = blocks_of(model)
        # Blocks that share a parameter (e.g. one memory value table read by several layers)
        # must be one FSDP unit: FSDP2 refuses a parameter managed by two groups.
        grouped = shared_param_groups(blocks)
        in_group = {i for group in grouped for i in group}
        for group in grouped:
            fully_shard([blocks[i] for i in group], reshard_after_forward=True, **kwargs)
        for i, block in enumerate(blocks):
            if i not in in_group:
                fully_shard(block, reshard_after_forward=True, **kwargs)
        # The root keeps its parameters (embedding, final norm, head) gathered from forward to
        # backward (FSDP2's default for the root), which saves one all-gather per step; the
        # price is the no_grad pitfall that `reshard_after_no_grad` handles.
        fully_shard(model, **kwargs)


def reshard_after_no_grad(model: nn.Module) -> None:
    """Call after any forward under torch.no_grad() (evaluation) of an FSDP2 model.

    Measured on torch 2.13 (references/platform.md): a no_grad forward leaves the modules that
    do not reshard after forward (the root, by default) holding unsharded parameters, and the
    next training step then computes wrong gradients for them (1.4-1.8x the true norm). FSDP2
    keeps the root unsharded after forward by design (pytorch/pytorch#131965, #154655); resharding
    explicitly restores the state a training forward expects."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ------------------------------------------------------------------ step statistics


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _replicas(t: torch.Tensor, world: int) -> int:
    """On how many ranks each element of `t`'s local data also lives (1 = no duplicates)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return world
    ways = 1
    for size, placement in zip(t.device_mesh.shape, t.placements):
        if placement.is_partial():
            raise ValueError("a gradient with a Partial placement cannot be normed locally")
        if not placement.is_replicate():  # Shard, and FSDP+TP's _StridedShard
            ways *= size
    return world // ways


def grad_sq_norm(params: list[torch.Tensor], world: int) -> torch.Tensor:
    """This rank's share of the global squared gradient norm: summing it over all ranks gives
    the squared norm of the whole gradient, whatever mix of FSDP shards, tensor-parallel shards
    and replicated parameters the model has (each local piece is weighted by 1 / its number
    of replicas). One all-reduce of the result over the world then gives the global norm; this
    avoids one collective per parameter, which `clip_grad_norm_` on DTensors would issue."""
    by_rep: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        local = _local(p.grad)
        if local.numel():
            by_rep.setdefault((_replicas(p.grad, world), local.device), []).append(local)
    device = next((d for _, d in by_rep), None)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (reps, _), grads in by_rep.items():
        norms = torch._foreach_norm([g.float() for g in grads]) if len(grads) > 1 \
            else [torch.linalg.vector_norm(grads[0].float())]
        total = total + torch.stack(norms).square().sum() / reps
    return total


def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every (local) gradient by min(1, max_norm / total_norm), on the device."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

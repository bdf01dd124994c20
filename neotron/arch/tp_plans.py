"""Tensor-parallel plans: how each block's parameters are split across the `tp` ranks.

Model code stays single-device (DESIGN.md). A block that supports tensor parallelism declares a
*plan* here, keyed by its module class: a function `plan(module) -> {submodule path:
ParallelStyle}` that `train/parallel.py` applies with
`torch.distributed.tensor.parallel.parallelize_module` on the `tp` sub-mesh (the empty path ""
styles the module itself). The plan holds no collectives of its own: the DTensor styles insert
them (an all-reduce after each row-wise projection, an all-gather of the logits).

Registering a block:

    @tp_plan(MyMixer, MyMixerConfig, check=my_check)
    def _my_mixer_plan(m: MyMixer) -> dict[str, ParallelStyle]:
        return {"w_in": ColwiseParallel(), "w_out": RowwiseParallel()}

`check(cfg, dim, tp)` returns `(key, message)` pairs for shapes that do not divide by `tp`; the
config validator reports them before anything is built. A block with parameters and no plan is
*data-parallel only*: a model using it with `parallel.tp > 1` is refused with a message naming
it (at config validation, and again at start-up for safety). Modules whose parameters stay
whole on every tp rank (norms) are registered with `tp_replicated`.

The Megatron-style layouts (Shoeybi et al. 2019, arXiv 1909.08053) as torchtitan expresses them
with DTensor (torchtitan `models/llama3/parallelize.py`); written here from the paper, not copied:
- attention: q, k, v column-wise (each rank owns n_heads / tp query heads and n_kv_heads / tp
  key/value heads; `Attention.forward` infers the local head count from the projection width),
  output projection row-wise;
- SwiGLU: gate and up column-wise, down row-wise;
- embedding vocab-parallel (rows split, lookups all-reduced), the LM head's weight split by
  vocabulary rows too (tied or not); the final norm's output is marked replicated so the head
  matmul yields vocabulary-sharded logits, which the model's output hook gathers, so the loss
  sees ordinary full logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.tensor import (
    DeviceMesh,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
)

from neotron.arch.attention import Attention, AttentionConfig
from neotron.arch.linear import DenseLinear
from neotron.arch.mlp import SwiGLU, SwiGLUConfig
from neotron.arch.model import CausalLM
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import FFNS, MIXERS, LayerConfig

Plan = Callable[[nn.Module], dict[str, ParallelStyle]]
Check = Callable[[LayerConfig, int, int], list[tuple[str, str]]]

_PLANS: dict[type, Plan] = {}
_CHECKS: dict[type, Check] = {}
_REPLICATED: set[type] = set()
# Projection classes the column/row-wise styles can split (they need an nn.Linear). A new
# linear type (bitnet, fp4, ...) that subclasses nn.Linear and keeps its weight as
# `weight [out, in]` can be added here once tested under tp > 1.
TP_LINEARS: set[str] = {"dense"}


def tp_plan(module_cls: type, config_cls: type | None = None, check: Check | None = None):
    """Decorator: register `plan` for `module_cls` (and the config check for `config_cls`)."""

    def deco(plan: Plan) -> Plan:
        _PLANS[module_cls] = plan
        if config_cls is not None:
            _CHECKS[config_cls] = check or (lambda cfg, dim, tp: [])
        return plan

    return deco


def tp_replicated(module_cls: type) -> None:
    """Declare that `module_cls`'s own parameters are kept whole on every tp rank."""
    _REPLICATED.add(module_cls)


def plan_for(module: nn.Module) -> Plan | None:
    for cls in type(module).__mro__:
        if cls in _PLANS:
            return _PLANS[cls]
    return None


def is_replicated(module: nn.Module) -> bool:
    return any(cls in _REPLICATED for cls in type(module).__mro__)


# ------------------------------------------------------------------ config-time checks


def _divides(key: str, what: str, n: int, tp: int) -> list[tuple[str, str]]:
    return [] if n % tp == 0 else [(key, f"{what}={n} is not divisible by parallel.tp={tp}")]


def tp_config_errors(model_cfg, tp: int) -> list[tuple[str, str]]:
    """(key path under `model.`, message) for every shape `tp` cannot split."""
    errors = _divides("vocab_size", "vocab_size", model_cfg.vocab_size, tp)
    if model_cfg.linear.type not in TP_LINEARS:
        errors.append(("linear.type", f"'{model_cfg.linear.type}' projections have no"
                       " tensor-parallel plan (data-parallel only); use parallel.tp=1"))
    for name, block in model_cfg.blocks.items():
        for part, registry in (("mixer", MIXERS), ("ffn", FFNS)):
            cfg = getattr(block, part)
            check = _CHECKS.get(type(cfg))
            where = f"blocks.{name}.{part}"
            if check is None:
                errors.append((f"{where}.type", f"{registry.kind} type '{cfg.type}' has no"
                               " tensor-parallel plan (data-parallel only); use parallel.tp=1 or"
                               " register one in neotron/arch/tp_plans.py"))
                continue
            errors += [(f"{where}.{k}", m) for k, m in check(cfg, model_cfg.dim, tp)]
    return errors


def unplanned_parameters(model: nn.Module) -> list[str]:
    """Modules holding parameters that no plan covers (start-up check for tp > 1)."""
    covered: set[str] = set()
    missing = []
    for name, module in model.named_modules():
        plan = plan_for(module)
        if plan is not None:
            covered.add(name)
            covered.update(f"{name}.{k}" if name else k for k in plan(module) if k)
        own = list(module.parameters(recurse=False))
        if own and name not in covered and not is_replicated(module):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            missing.append(f"{name} ({type(module).__name__} in {type(parent).__name__})")
    return missing


# ------------------------------------------------------------------ plans


def _attention_check(cfg: AttentionConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    kv = cfg.n_kv_heads or cfg.n_heads
    return _divides("n_heads", "n_heads", cfg.n_heads, tp) + _divides(
        "n_kv_heads", "n_kv_heads", kv, tp
    )


@tp_plan(Attention, AttentionConfig, check=_attention_check)
def _attention_plan(m: Attention) -> dict[str, ParallelStyle]:
    return {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
            "wo": RowwiseParallel()}


def _swiglu_check(cfg: SwiGLUConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    return _divides("hidden_dim", "hidden_dim", cfg.hidden(dim), tp)


@tp_plan(SwiGLU, SwiGLUConfig, check=_swiglu_check)
def _swiglu_plan(m: SwiGLU) -> dict[str, ParallelStyle]:
    return {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}


class ShardRows(ParallelStyle):
    """Split a module's weight by rows (Shard(0)) with no forward hooks: for a weight the
    model uses through `F.linear(h, weight)` rather than by calling the module (the LM head)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                dt = distribute_tensor(param.detach(), mesh, [Shard(0)])
                mod.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

        return distribute_module(module, device_mesh, partition)


@tp_plan(CausalLM)
def _causal_lm_plan(m: CausalLM) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        # vocab-parallel lookup: each rank holds vocab_size / tp rows; partial sums all-reduced
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # the hidden state entering the head is the same on every rank: say so, so that
        # F.linear(h, vocab-sharded weight) gives vocab-sharded logits (and h's gradient, a
        # partial sum over the vocabulary shards, is all-reduced on the way back)
        "norm": PrepareModuleOutput(output_layouts=Replicate(),
                                    desired_output_layouts=Replicate(), use_local_output=False),
        # logits [B, T, V/tp] -> all-gathered full logits, a plain tensor again
        "": PrepareModuleOutput(output_layouts=Shard(2), desired_output_layouts=Replicate(),
                                use_local_output=True),
    }
    if m.head is not None:
        plan["head"] = ShardRows()
    return plan


tp_replicated(RMSNorm)
# DenseLinear is split only by the plan of the block that owns it; it has no plan of its own.
assert issubclass(DenseLinear, nn.Linear)

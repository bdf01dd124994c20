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
  sees ordinary full logits;
- memory layers (product-key `memory`, `ultramem`): the value table sharded along the value
  dimension, retrieval replicated; see "Memory layers" below;
- TokenFormer's Pattention, as a projection (column or row position) or as the FFN (parameter
  tokens split): `PattentionParallel`;
- MemoryFormer: hash tables split by output columns (q, k, v, the FFN's first layer) or by hash
  group (the FFN's second layer): `MemoryFormerParallel`.
Attention's qk_norm is refused under tp (its weight, shared by the split heads, would need its
gradient all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import (
    DeviceMesh,
    DTensor,
    Partial,
    Placement,
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
from neotron.arch.memory import ProductKeyMemory, ProductKeyMemoryConfig
from neotron.arch.memoryformer import (
    MemoryFormerAttention,
    MemoryFormerAttentionConfig,
    MemoryFormerFFN,
    MemoryFormerFFNConfig,
)
from neotron.arch.mlp import SwiGLU, SwiGLUConfig
from neotron.arch.model import CausalLM
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import FFNS, MIXERS, LayerConfig
from neotron.arch.tokenformer import Pattention, PattentionFFN, PattentionFFNConfig
from neotron.arch.ultramem import UltraMem, UltraMemConfig

Plan = Callable[[nn.Module], dict[str, ParallelStyle]]
Check = Callable[[LayerConfig, int, int], list[tuple[str, str]]]

_PLANS: dict[type, Plan] = {}
_CHECKS: dict[type, Check] = {}
_REPLICATED: set[type] = set()
# Projection classes the column/row-wise styles can split (they need an nn.Linear). A new
# linear type (bitnet, fp4, ...) that subclasses nn.Linear and keeps its weight as
# `weight [out, in]` can be added here once tested under tp > 1.
TP_LINEARS: set[str] = {"dense", "pattention"}


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
    n_tokens = getattr(model_cfg.linear, "n_tokens", None)
    if model_cfg.linear.type == "pattention" and n_tokens is not None:
        # row-parallel Pattention projections split their parameter tokens
        errors += _divides("linear.n_tokens", "n_tokens", n_tokens, tp)
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


def _qk_norm_check(cfg: AttentionConfig, tp: int) -> list[tuple[str, str]]:
    # The q/k norms' weight is shared by all heads; with the heads split over tp its gradient
    # is a partial sum per rank and would need an all-reduce that no plan inserts yet.
    if not cfg.qk_norm:
        return []
    return [("qk_norm", f"qk_norm has no tensor-parallel plan (its weight's gradient sums over"
             f" heads split across parallel.tp={tp}); use qk_norm=false or parallel.tp=1")]


def _attention_check(cfg: AttentionConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    kv = cfg.n_kv_heads or cfg.n_heads
    return _divides("n_heads", "n_heads", cfg.n_heads, tp) + _divides(
        "n_kv_heads", "n_kv_heads", kv, tp
    ) + _qk_norm_check(cfg, tp)


class PattentionParallel(ParallelStyle):
    """TokenFormer's Pattention (neotron/arch/tokenformer.py) under tp. Its own forward runs on
    DTensors (x K^T, the row norm, Theta V): the placements below decide the collectives, which
    DTensor inserts.
    - "col" (the column-parallel position: q, k, v, w1, w3): keys whole, values Shard(1); each
      rank scores all n tokens and computes its out/tp output columns; no collective.
    - "tokens" (the parameter tokens split, replicated input and output: the Pattention FFN):
      keys and values Shard(0); each rank scores its n/tp tokens, the row norm's statistic is
      all-reduced ([tokens, 1]; softmax all-gathers the scores [tokens, n] instead), and
      Theta V is all-reduced [tokens, out].
    - "row" (the row-parallel position: wo, w2, whose input columns are split): the input is
      all-gathered [tokens, in], then as "tokens". (Splitting the keys by input columns
      instead leaves partial scores, whose all-reduce [tokens, n] costs the same, and
      DTensor cannot run the norm's backward on them: an in-place op on a Partial gradient.)"""

    # (keys, values, bias, input as it comes, output)
    LAYOUTS: dict[str, tuple[Placement, ...]] = {
        "col": (Replicate(), Shard(1), Shard(0), Replicate(), Shard(-1)),
        "row": (Shard(0), Shard(0), Replicate(), Shard(-1), Replicate()),
        "tokens": (Shard(0), Shard(0), Replicate(), Replicate(), Replicate()),
    }

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = self.LAYOUTS[layout]

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        keys, values, bias, inp, out = self.layout

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, placement in (("keys", keys), ("values", values), ("bias", bias)):
                p = mod._parameters.get(pname)
                if p is not None:
                    dt = distribute_tensor(p.detach(), mesh, [placement])
                    mod.register_parameter(pname, nn.Parameter(dt, requires_grad=p.requires_grad))

        def inputs(mod: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            x = DTensor.from_local(args[0], mesh, [inp], run_check=False)
            return (x.redistribute(mesh, [Replicate()]), *args[1:])

        def outputs(mod: nn.Module, y: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return y.redistribute(mesh, [out]).to_local()

        return distribute_module(module, device_mesh, partition, input_fn=inputs,
                                 output_fn=outputs)


def _col(m: nn.Module) -> ParallelStyle:
    return PattentionParallel("col") if isinstance(m, Pattention) else ColwiseParallel()


def _row(m: nn.Module) -> ParallelStyle:
    return PattentionParallel("row") if isinstance(m, Pattention) else RowwiseParallel()


@tp_plan(Attention, AttentionConfig, check=_attention_check)
def _attention_plan(m: Attention) -> dict[str, ParallelStyle]:
    return {"wq": _col(m.wq), "wk": _col(m.wk), "wv": _col(m.wv), "wo": _row(m.wo)}


def _swiglu_check(cfg: SwiGLUConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    return _divides("hidden_dim", "hidden_dim", cfg.hidden(dim), tp)


@tp_plan(SwiGLU, SwiGLUConfig, check=_swiglu_check)
def _swiglu_plan(m: SwiGLU) -> dict[str, ParallelStyle]:
    return {"w1": _col(m.w1), "w3": _col(m.w3), "w2": _row(m.w2)}


def _pattention_ffn_check(cfg: PattentionFFNConfig, dim: int, tp: int
                          ) -> list[tuple[str, str]]:
    return _divides("n_tokens", "n_tokens (None = 4 * model.dim)"
                    if cfg.n_tokens is None else "n_tokens", cfg.n_tokens or 4 * dim, tp)


@tp_plan(PattentionFFN, PattentionFFNConfig, check=_pattention_ffn_check)
def _pattention_ffn_plan(m: PattentionFFN) -> dict[str, ParallelStyle]:
    return {"pattention": PattentionParallel("tokens")}


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


# ------------------------------------------------------------------ memory layers
#
# Memory layers (Lample et al. 2019; Berges et al. 2024, arXiv 2412.09764, which shards the
# value table along the embedding dimension; UltraMemV2, arXiv 2508.18756, `vertical_parallel`)
# split the value table by columns, Shard(1): each tp rank holds v/tp columns of every slot.
# The tp group sees the same tokens, so retrieval (query, keys, scores, top-k, the permutation)
# runs whole and identically on every rank; each rank reads its columns of the selected rows
# and computes its slice of the weighted sum m, which is the column-parallel input of the
# row-parallel W_o: one all-reduce of [tokens, dim] after W_o, and no collective over the
# table. The collectives, in Megatron's terms (Shoeybi et al. 2019, the f and g operators):
# - retrieval weights entering the read: identity forward; their gradient, each rank's dot
#   product over its columns only, all-reduced in backward (`_enter_shards`);
# - UltraMem's pre-value scores <W_pre x, pre_values[row]>, pre_dim sharded the same way: the
#   partial dot products [tokens, heads * knn] all-reduced in forward, identity backward
#   (`_sum_shards`);
# - W_s / W_pre column-parallel and W_o row-parallel (DTensor's styles).
# Sharding by slots (rows) instead would leave every rank a different subset of the k rows a
# token reads: the sum over slots needs the same one all-reduce, but the load follows the
# (skewed) slot popularity, the weights' gradients need the rows' owners, and UltraMem's
# pre-value dot products would be whole on one rank and zero elsewhere; columns split every
# read evenly whatever the routing.


def _enter_shards(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward, the sum over the tp ranks of t's gradient (each rank's
    gradient is its value shard's part of a dot product)."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(
        grad_placements=[Partial()])


def _sum_shards(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum over the tp ranks of t (partial dot products), as a plain tensor; identity
    backward (the gradient of the sum is the same for every rank's part)."""
    return DTensor.from_local(t, mesh, [Partial()], run_check=False).full_tensor()


def _local_table(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardParams(ParallelStyle):
    """Distribute a module's own parameters with the given placements, no hooks (the module's
    seams take their local shards). A parameter shared with a module distributed before gets
    the same DTensor Parameter, so the layers stay tied."""

    def __init__(self, placements: dict[str, Placement]) -> None:
        super().__init__()
        self.placements = placements

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, placement in self.placements.items():
            param = module._parameters.get(name)
            if param is None or isinstance(param, DTensor):
                continue
            # The original Parameter remembers its DTensor, so that a table shared by several
            # layers (share_values) becomes one DTensor Parameter, not one per layer.
            shared = getattr(param, "_neotron_tp_param", None)
            if shared is None:
                dt = distribute_tensor(param.detach(), device_mesh, [placement])
                shared = nn.Parameter(dt, requires_grad=param.requires_grad)
                param._neotron_tp_param = shared
            module.register_parameter(name, shared)
        return module


class Replicated(ParallelStyle):
    """A submodule whose parameters stay whole (plain tensors) on every tp rank: the tp group
    computes it redundantly on the same tokens (memory retrieval). No hooks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return module


class ShardedRead(ParallelStyle):
    """The value read of a memory layer on a value-dim (Shard(1)) table.

    Inputs: (table, ..., weights) with the table first and the retrieval weights last; the
    table becomes its local shard (its gradient flows back as the DTensor's Shard(1)
    gradient), the weights enter the sharded region (`_enter_shards`). `split_cores`: the
    weights' last dimension is UltraMem's C Tucker cores, each weighting one of C equal
    column chunks; the rank keeps the cores whose chunks its columns hold (C / tp of them,
    or the one core its columns are part of when tp > C). Output: the local slice of m
    [N, v/tp], the column-parallel input of W_o; `gather`: all-gathered (plain PKM without
    W_o, whose output is m; an all-gather of activations, not of the table)."""

    def __init__(self, *, split_cores: bool = False, gather: bool = False) -> None:
        super().__init__()
        self.split_cores, self.gather = split_cores, gather

    def _prepare_inputs(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        table, *middle, weights = inputs
        weights = _enter_shards(weights, mesh)
        if self.split_cores:
            cores, tp = weights.shape[-1], mesh.size()
            first = mesh.get_local_rank() * cores // tp
            weights = weights[..., first:first + max(1, cores // tp)]
        return (_local_table(table), *middle, weights)

    def _prepare_output(self, module: nn.Module, output: torch.Tensor, mesh: DeviceMesh
                        ) -> torch.Tensor:
        if not self.gather:
            return output
        return DTensor.from_local(output, mesh, [Shard(-1)], run_check=False).full_tensor()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, input_fn=lambda m, i, d: self._prepare_inputs(m, i, d),
            output_fn=lambda m, o, d: self._prepare_output(m, o, d))


class ShardedDot(ParallelStyle):
    """UltraMem's pre-value scores on a value-dim (Shard(1)) pre-value table: inputs (table,
    rows, q) with q already the column-parallel W_pre's local slice; the table becomes its
    local shard; the output, partial dot products, is summed over the tp ranks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def inputs(m: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            return (_local_table(args[0]), *args[1:])

        return distribute_module(module, device_mesh, input_fn=inputs,
                                 output_fn=lambda m, out, mesh: _sum_shards(out, mesh))


def _ffn_check(cfg: SwiGLUConfig | None, dim: int, tp: int) -> list[tuple[str, str]]:
    if cfg is None:
        return []
    return [(f"parallel_ffn.{k}", msg) for k, msg in _swiglu_check(cfg, dim, tp)]


def _value_dim_check(v: int, v_dim: int | None, tp: int) -> list[tuple[str, str]]:
    if v % tp == 0:
        return []
    what = f"v_dim={v}" if v_dim is not None else f"v_dim (None = model.dim = {v})"
    return [("v_dim", f"{what} is not divisible by parallel.tp={tp} (the value table is split"
             " along the value dimension)")]


def _memory_check(cfg: ProductKeyMemoryConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    return _value_dim_check(cfg.v_dim or dim, cfg.v_dim, tp) + _ffn_check(cfg.parallel_ffn,
                                                                           dim, tp)


@tp_plan(ProductKeyMemory, ProductKeyMemoryConfig, check=_memory_check)
def _memory_plan(m: ProductKeyMemory) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "query": Replicated(),
        "read": ShardedRead(gather=m.ws is None),
        "": ShardParams({"values": Shard(1)}),
    }
    if m.ws is not None:  # Memory+: W_o (m * SiLU(W_s x)); W_s's output is value-dim
        plan.update(ws=_col(m.ws), wo=_row(m.wo))
    if m.gate is not None:
        plan["gate"] = Replicated()
    return plan


def _ultramem_check(cfg: UltraMemConfig, dim: int, tp: int) -> list[tuple[str, str]]:
    v = cfg.v_dim or dim
    errors = _value_dim_check(v, cfg.v_dim, tp)
    pre = v if cfg.pre_dim is None else cfg.pre_dim
    if pre % tp:
        what = f"pre_dim={pre}" if cfg.pre_dim is not None else f"pre_dim (None = v_dim = {pre})"
        errors.append(("pre_dim", f"{what} is not divisible by parallel.tp={tp} (the pre-value"
                       " table is split along its width)"))
    C = cfg.tucker_cores
    if C % tp and tp % C:
        errors.append(("tucker_cores", f"tucker_cores={C} and parallel.tp={tp}: one must divide"
                       " the other (each rank's value columns must hold whole core chunks, or"
                       " lie in one)"))
    if cfg.expand != 1:
        errors.append(("expand", f"expand={cfg.expand} has no tensor-parallel plan (W_o's"
                       " input would be strided by expansion block); use expand=1 or"
                       " parallel.tp=1"))
    return errors + _ffn_check(cfg.parallel_ffn, dim, tp)


@tp_plan(UltraMem, UltraMemConfig, check=_ultramem_check)
def _ultramem_plan(m: UltraMem) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "query": Replicated(),
        "read": ShardedRead(split_cores=True),
        "wo": _row(m.wo),
        "": ShardParams({"values": Shard(1), "pre_values": Shard(1)}),
    }
    if m.pre is not None:
        plan.update(pre=_col(m.pre), pre_score=ShardedDot())
    return plan


# ------------------------------------------------------------------ MemoryFormer
#
# A MemoryFormer layer (neotron/arch/memoryformer.py) sums one row of each of K hash tables
# [K, 2^tau, out], table k addressed by the signs of input chunk k. Column-parallel: the tables
# split along their output width (Shard(2)); every rank hashes the whole input and reads its
# out/tp columns of the K rows. Row-parallel, by hash group: the tables split by k (Shard(0));
# a rank holds the K/tp tables of the input chunks in its input columns and its partial sum is
# all-reduced. The seam `TableLookup` receives the tables and bias and gets their local shards.


class MemoryFormerParallel(ParallelStyle):
    """A MemoryFormerLinear's `lookup` seam under tp, "col" or "row" (see above).

    col: the input z enters the tp region (identity forward, gradient all-reduced); output
    the local out/tp columns, or (`gather`) all-gathered. row: z is the rank's input columns
    (or, `replicated_input`, the whole input, of which the rank keeps its columns); the partial
    sum is all-reduced and the (replicated) bias added once, after it."""

    def __init__(self, layout: str, *, gather: bool = False, replicated_input: bool = False
                 ) -> None:
        super().__init__()
        self.layout, self.gather, self.replicated_input = layout, gather, replicated_input

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        col = self.layout == "col"
        tables, bias = module._parameters["tables"], module._parameters.get("bias")
        for name, p, placement in (("tables", tables, Shard(2) if col else Shard(0)),
                                   ("bias", bias, Shard(0) if col else Replicate())):
            if p is not None:
                dt = distribute_tensor(p.detach(), device_mesh, [placement])
                module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        deferred: list[torch.Tensor | None] = []  # row: the bias, added after the all-reduce

        def inputs(m: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            z, table, b = args
            if col:
                return (_enter_shards(z, mesh), _local_table(table), _local_table(b))
            if self.replicated_input:
                z = DTensor.from_local(z, mesh, [Replicate()], run_check=False).redistribute(
                    mesh, [Shard(-1)]).to_local()
            deferred[:] = [_local_table(b)]
            return (z, _local_table(table), None)

        def outputs(m: nn.Module, y: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
            if col:
                if not self.gather:
                    return y
                return DTensor.from_local(y, mesh, [Shard(-1)], run_check=False).full_tensor()
            y = _sum_shards(y, mesh)
            b = deferred.pop()
            return y if b is None else y + b

        distribute_module(module.lookup, device_mesh, input_fn=inputs, output_fn=outputs)
        return module


def _memoryformer_attention_check(cfg: MemoryFormerAttentionConfig, dim: int, tp: int
                                  ) -> list[tuple[str, str]]:
    return _divides("n_heads", "n_heads", cfg.n_heads, tp) + _qk_norm_check(cfg, tp)


@tp_plan(MemoryFormerAttention, MemoryFormerAttentionConfig, check=_memoryformer_attention_check)
def _memoryformer_attention_plan(m: MemoryFormerAttention) -> dict[str, ParallelStyle]:
    # q, k, v column-parallel (heads split, as attention's); no output projection, so the
    # heads' outputs [tokens, dim/tp] are all-gathered where it would have been
    return {"wq": MemoryFormerParallel("col"), "wk": MemoryFormerParallel("col"),
            "wv": MemoryFormerParallel("col"),
            "wo": PrepareModuleOutput(output_layouts=Shard(-1), desired_output_layouts=Replicate(),
                                      use_local_output=True)}


def _memoryformer_ffn_check(cfg: MemoryFormerFFNConfig, dim: int, tp: int
                            ) -> list[tuple[str, str]]:
    K = dim // cfg.tau
    return [] if K % tp == 0 else [("tau", f"model.dim / tau = {K} hash tables per layer is not"
                                    f" divisible by parallel.tp={tp}")]


@tp_plan(MemoryFormerFFN, MemoryFormerFFNConfig, check=_memoryformer_ffn_check)
def _memoryformer_ffn_plan(m: MemoryFormerFFN) -> dict[str, ParallelStyle]:
    # up column-parallel, its output all-gathered: the LayerNorm between the two layers needs
    # whole rows (it runs replicated); down row-parallel by hash group, on its input columns
    return {"up": MemoryFormerParallel("col", gather=True), "norm": Replicated(),
            "down": MemoryFormerParallel("row", replicated_input=True)}


tp_replicated(RMSNorm)
# DenseLinear is split only by the plan of the block that owns it; it has no plan of its own.
assert issubclass(DenseLinear, nn.Linear)

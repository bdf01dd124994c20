"""Product-key memory layers (FFN type `memory`), and the sparse-table gradient clipping.

Lample et al., "Large Memory Layers with Product Keys", NeurIPS 2019 (arXiv 1907.05242);
Berges, Oguz et al., "Memory Layers at Scale", arXiv 2412.09764 (code read:
facebookresearch/memory@7f85280cee lingua/product_key/memory.py); UltraMemV2 placement
(arXiv 2508.18756: a memory layer in parallel with the FFN of every block). Our own code.

For a token x, with H heads, n sub-keys per half (n^2 value slots) and k = knn:

    q = W_q x                              [H, k_dim], each head split in halves q1, q2
    s1 = q1 K1^T, s2 = q2 K2^T             [H, n] each
    top-k of s1 and of s2; the k x k sums s1[i] + s2[j] with slot i * n + j; top-k of those.
        Exact: the best pair's halves are each among their half's top k.
    w = softmax(scores)                    over the k slots of each head, in fp32
    m = sum_h sum_j w_hj V[slot_hj]        the weighted embedding bag of the value table
    out = W_o (m * SiLU(W_s x))            Memory+ (`swilu`); plain PKM returns m
    out *= sigmoid(w_g . x)                optional gate

Placement, by config:
- by layer index: give a block whose `ffn` is `memory` and name its layers with the model's
  `block_at` key, e.g. `block_at: {memory: [4, 12, 20]}` (Meta's "4,12,20");
- in parallel with the FFN of every block (UltraMemV2): `ffn: {type: memory,
  parallel_ffn: {type: swiglu}}` in the block every layer uses.

`share_values: true` makes every sharing memory layer of one model read and train the same
value table (Meta's `mem_share_values`, their default): the table is created by the first
such layer and registered, the same Parameter, in the others.

The value table has the optimizer role "sparse" (`_neotron_param_groups`: AdamW with its own
learning rate, `optim.sparse_lr`; Meta uses a fixed 1e-3, UltraMemV2 4x the base lr; no weight
decay unless `value_weight_decay`) and its own gradient-norm limit (config `value_grad_clip`),
applied by `clip_sparse_grads_`: Meta clips value gradients apart from the rest.

`init: reference`, `bias: true` and `value_weight_decay: 0.1` give Meta's construction
(HashingMemory.__init__ / reset_parameters, lingua/optim.py); docs/memory_layers.md has the
table of differences and what was measured.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.deltanet import init_normal
from neotron.arch.linear import DenseLinear, DenseLinearConfig, make_linear
from neotron.arch.memoryformer import GROUPS_ATTR
from neotron.arch.mlp import SwiGLU, SwiGLUConfig
from neotron.arch.registry import FFNS, LayerConfig
from neotron.kernels.embedding_bag import embedding_bag


class ProductKeyMemoryConfig(LayerConfig):
    type: Literal["memory"] = "memory"
    n_keys: int = Field(default=256, ge=2, description="sub-keys per half: n^2 value slots")
    heads: int = Field(default=4, gt=0)
    knn: int = Field(default=32, gt=0, description="slots read per head (top-k)")
    k_dim: int = Field(default=256, gt=0, description="query / key width per head (even)")
    v_dim: int | None = Field(default=None, gt=0, description="value width; None = model.dim")
    query_bias: bool = True
    swilu: bool = Field(default=True, description="Memory+: out = W_o(m * SiLU(W_s x))")
    gated: bool = Field(default=False, description="out *= sigmoid(w_g . x)")
    share_values: bool = Field(default=False,
                               description="one value table for all sharing memory layers")
    value_init_std: float | None = Field(default=None, gt=0, description="None = v_dim^-0.5")
    value_grad_clip: float = Field(
        default=1.0, ge=0, description="max grad norm of the value tables (their own); 0 = off")
    parallel_ffn: SwiGLUConfig | None = Field(
        default=None, description="UltraMemV2 style: also run this FFN and add its output")
    impl: Literal["auto", "fast", "reference"] = "auto"
    init: Literal["neotron", "reference"] = Field(
        default="neotron",
        description="neotron: W_q, W_s, gate N(0, init_std) truncated, W_o depth-scaled"
        " (out_std); reference (Meta's HashingMemory.reset_parameters): W_q xavier-uniform,"
        " W_s, W_o and the gate N(0, 1/dim) untruncated. Keys U(+-1/sqrt(k_dim)) and values"
        " N(0, 1/v_dim) in both",
    )
    bias: bool = Field(
        default=False,
        description="biases on W_s, W_o and the gate (Meta's nn.Linear layers have them);"
        " initialized to zero",
    )
    value_weight_decay: float = Field(
        default=0.0, ge=0,
        description="AdamW weight decay of the value table (Meta's lingua decays every"
        " parameter with optim.weight_decay, 0.1)",
    )

    def check(self, dim: int) -> list[tuple[str, str]]:
        errors = []
        if self.knn > self.n_keys:
            errors.append(("knn", f"knn={self.knn} exceeds n_keys={self.n_keys}"))
        if self.k_dim % 2:
            errors.append(("k_dim", f"k_dim={self.k_dim} must be even (two halves)"))
        if not self.swilu and self.v_dim not in (None, dim):
            errors.append(("v_dim", f"without swilu the values are the output: v_dim must"
                           f" equal model.dim={dim}"))
        return errors


def product_key_topk(s1: torch.Tensor, s2: torch.Tensor, knn: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the n1 x n2 grid of sums s1[i] + s2[j], without forming it.

    s1 [..., n1], s2 [..., n2] -> (scores [..., knn] descending, slots i * n2 + j [..., knn]).
    Differentiable in s1 and s2 (the scores are gathered sums)."""
    v1, i1 = s1.topk(knn, dim=-1)
    v2, i2 = s2.topk(knn, dim=-1)
    grid = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [..., knn * knn]
    scores, flat = grid.topk(knn, dim=-1)
    slots = i1.gather(-1, flat // knn) * s2.shape[-1] + i2.gather(-1, flat % knn)
    return scores, slots


def brute_force_topk(s1: torch.Tensor, s2: torch.Tensor, knn: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of `product_key_topk`: top-k over all n1 * n2 sums."""
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2).topk(knn, dim=-1)


# Shared value tables, per model under construction (weak: a dropped model frees its entry).
_SHARED_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_under_construction() -> nn.Module | None:
    """The CausalLM whose constructor is building the calling layer, found on the call
    stack; None for a layer built on its own. BuildContext has no per-model scratch space,
    and this keeps sharing scoped to exactly one model (two models built from one config do
    not share)."""
    from neotron.arch.model import CausalLM  # lazy: arch.model imports this module's registry

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CausalLM):
            return owner
        frame = frame.f_back
    return None


class ValueRead(nn.Module):
    """The weighted embedding bag m = sum_l w[:, l] * table[idx[:, l]], as a module with no
    parameters of its own (the table is its caller's): the seam where a tensor-parallel plan
    (neotron/arch/tp_plans.py) hands it the local value-dim shard of the table and marks the
    weights as entering the sharded region. On one device it is the plain call."""

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        return embedding_bag(table, idx, weights, impl=self.impl)


@FFNS.register(ProductKeyMemoryConfig)
class ProductKeyMemory(nn.Module):
    _neotron_param_groups = {"values": "sparse"}  # AdamW with its own lr (optim.sparse_lr)

    def __init__(self, ctx: BuildContext, *, cfg: ProductKeyMemoryConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        dim = ctx.dim
        self.heads, self.knn, self.n_keys = cfg.heads, cfg.knn, cfg.n_keys
        self.k_dim = cfg.k_dim
        self.v_dim = cfg.v_dim or dim
        self.query = make_linear(dim, cfg.heads * cfg.k_dim, ctx.linear, bias=cfg.query_bias)
        # [heads, half (2), n, k_dim / 2]: both halves' sub-keys, scored in one einsum
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
        self.values = self._value_table(cfg.n_keys**2, self.v_dim)
        self.ws = self.wo = self.gate = None
        if cfg.swilu:
            self.ws = make_linear(dim, self.v_dim, ctx.linear, bias=cfg.bias)
            self.wo = make_linear(self.v_dim, dim, ctx.linear, bias=cfg.bias)
        if cfg.gated:
            self.gate = make_linear(dim, 1, DenseLinearConfig(), bias=cfg.bias)
        self.read = ValueRead(cfg.impl)
        self.ffn = SwiGLU(ctx, cfg=cfg.parallel_ffn) if cfg.parallel_ffn is not None else None
        if cfg.value_weight_decay > 0:
            # AdamW weight decay of the table, over the "sparse" role's 0 (neotron.optim.routing
            # reads this module attribute; a Parameter attribute would not survive
            # materialization and FSDP2).
            self._neotron_weight_decay = {"values": cfg.value_weight_decay}

    def _value_table(self, rows: int, width: int) -> nn.Parameter:
        """A new table, or the one of the first sharing memory layer of the same model."""
        model = _model_under_construction() if self.cfg.share_values else None
        shared = _SHARED_VALUES.setdefault(model, {}) if model is not None else {}
        owner = shared.setdefault((rows, width), self)
        # A plain reference, not a submodule: the owner is registered where it is built.
        object.__setattr__(self, "_values_owner", owner)
        return owner.values if owner is not self else nn.Parameter(torch.empty(rows, width))

    def _value_max_norm(self) -> float:
        return self.cfg.value_grad_clip if self.cfg.value_grad_clip > 0 else math.inf

    def _sparse_tables(self) -> list[tuple[nn.Parameter, float | None]]:
        return [(self.values, self._value_max_norm())]

    def init_weights(self) -> None:
        reference = self.cfg.init == "reference"
        if reference and type(self.query) is DenseLinear:
            # Meta: xavier_uniform_ on the query weight; its bias is not reset there (left as
            # nn.Linear's meta-device init, i.e. uninitialized after to_empty): zero here.
            nn.init.xavier_uniform_(self.query.weight)
            if self.query.bias is not None:
                nn.init.zeros_(self.query.bias)
        else:
            self.query.init_weights(self.ctx.init_std)
        bound = 1.0 / math.sqrt(self.k_dim)  # Meta: U(-1/sqrt(k), 1/sqrt(k))
        nn.init.uniform_(self.keys, -bound, bound)
        owner = self._values_owner
        if owner is not self:
            # Materializing a meta model (to_empty) gives every module its own new Parameter,
            # which unties shared tables; tie again to the owner's (initialized before us:
            # it is an earlier layer).
            self.values = owner.values
        else:
            std = self.cfg.value_init_std or self.v_dim**-0.5  # Meta: N(0, 1/d)
            nn.init.normal_(self.values, mean=0.0, std=std)
        if reference:
            # Meta: N(0, output_dim^-1/2) for W_s and W_o, N(0, input_dim^-1/2) for the gate;
            # output_dim = input_dim = model dim. Biases (bias: true) zero, as above.
            std = self.ctx.dim**-0.5
            for proj in (self.ws, self.wo, self.gate):
                if proj is not None:
                    init_normal(proj, std)
        else:
            if self.ws is not None:
                self.ws.init_weights(self.ctx.init_std)
                self.wo.init_weights(self.ctx.out_std)
            if self.gate is not None:
                self.gate.init_weights(self.ctx.init_std)
        if self.ffn is not None:
            self.ffn.init_weights()

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (slots [N, heads, knn], weights [N, heads, knn] fp32)."""
        N = x.shape[0]
        # Scores and top-k in fp32 (or wider), outside autocast: bf16 rounding reorders
        # near-ties. The query projection runs in its parameters' dtype (bf16 under FSDP2's
        # mixed precision, where x is bf16 too).
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q = self.query(x).to(wide).view(N, self.heads, 2, self.k_dim // 2)
            s = torch.einsum("nhcd,hcmd->nhcm", q, self.keys.to(wide))  # [N, H, 2, n]
            scores, slots = product_key_topk(s[:, :, 0], s[:, :, 1], self.knn)
            return slots, scores.softmax(dim=-1)

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        N = xf.shape[0]
        slots, w = self.lookup(xf)
        L = self.heads * self.knn
        m = self.read(self.values, slots.view(N, L), w.view(N, L))
        if self.ws is not None:
            out = self.wo(m.to(x.dtype) * F.silu(self.ws(xf)))
        else:
            out = m
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(xf))
        out = out.to(x.dtype).view(shape)
        if self.ffn is not None:
            out = out + self.ffn(x, seq)
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul-like work only (docs/accounting.md): top-k, softmax, SiLU and the gate's
        sigmoid are elementwise or comparisons, not counted."""
        H, n, k, kd, v = self.heads, self.n_keys, self.knn, self.k_dim, self.v_dim
        # Sub-key scores: 2 halves x n keys x k_dim/2 MACs per head; x3 with the backward.
        scoring = 3 * 2 * H * n * kd
        # Value reads: k rows of v per head forward (2 H k v); backward the weight
        # gradients (2 H k v) and the rows' gradients (2 H k v). Never n^2.
        values = 6 * H * k * v
        total = self.query.flops_per_token(seq_len) + scoring + values
        for proj in (self.ws, self.wo, self.gate, self.ffn):
            if proj is not None:
                total += proj.flops_per_token(seq_len)
        return float(total)

    def active_params(self) -> dict[str, float]:
        """Of the value table, a token reads heads x knn rows (the keys are all scored)."""
        return {"values": float(self.heads * self.knn * self.v_dim)}

    def extra_repr(self) -> str:
        return (f"slots={self.n_keys}^2, heads={self.heads}, knn={self.knn},"
                f" k_dim={self.k_dim}, v_dim={self.v_dim}, shared={self.cfg.share_values}")


def shared_param_groups(blocks: list[nn.Module]) -> list[list[int]]:
    """The blocks (indices into `blocks`) that share a parameter with another, grouped:
    e.g. [[1, 3]] for memory layers 1 and 3 reading one shared value table. FSDP2 refuses a
    parameter in two FSDP groups; wrap each group with one `fully_shard([blocks...])` call
    (and the other blocks one by one)."""
    parent = list(range(len(blocks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            j = owner.setdefault(id(p), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(blocks)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# ---------------------------------------------------------------- sparse-table clipping


def sparse_tables(model: nn.Module) -> list[tuple[nn.Parameter, float | None]]:
    """(table, its own max grad norm or None) for every sparse table of the model.

    Found through the modules, never through Parameter attributes alone (materialization and
    FSDP2 replace the Parameter objects): a module's `_sparse_tables()` names its tables and
    their limits; other modules' parameters with the "sparse" role in `_neotron_param_groups`
    (or the `_neotron_group` Parameter tag) come with no limit of their own."""
    found: dict[int, tuple[nn.Parameter, float | None]] = {}
    for mod in model.modules():
        owned = getattr(mod, "_sparse_tables", None)
        if callable(owned):
            for p, limit in owned():
                found.setdefault(id(p), (p, limit))
            continue
        for leaf, role in (getattr(mod, GROUPS_ATTR, None) or {}).items():
            p = mod._parameters.get(leaf)
            if role == "sparse" and p is not None:
                found.setdefault(id(p), (p, None))
        for p in mod.parameters(recurse=False):
            if getattr(p, "_neotron_group", None) == "sparse":
                found.setdefault(id(p), (p, None))
    return list(found.values())


def sparse_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that are sparse tables (memory values, MemoryFormer hash tables)."""
    return [p for p, _ in sparse_tables(model)]


def dense_params(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter: what the trainer's global gradient clipping should cover."""
    skip = {id(p) for p in sparse_params(model)}
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _full(norm: torch.Tensor) -> torch.Tensor:
    # Under FSDP2 / tensor parallel the norm of DTensor gradients is itself a DTensor.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def clip_sparse_grads_(model: nn.Module, default_max_norm: float | None = None) -> torch.Tensor:
    """Clip the gradients of sparse tables apart from the rest of the model.

    Tables are grouped by their own limit (from the layer config, e.g. `value_grad_clip`;
    inf = measured, not clipped); tables without one (MemoryFormer's) use
    `default_max_norm` (None or <= 0: not clipped). Each group's total norm is clipped to
    its limit. Returns the total norm of all sparse-table gradients before clipping
    (0 when there are none), as a CPU scalar tensor.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for p, limit in sparse_tables(model):
        if p.grad is None:
            continue
        limit = limit if limit is not None else default_max_norm
        groups.setdefault(limit if limit and limit > 0 else math.inf, []).append(p)
    sq = torch.zeros((), dtype=torch.float64)
    for limit, params in sorted(groups.items()):
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=False)
        sq = sq + _full(norm).detach().double().cpu() ** 2
    return sq.sqrt()

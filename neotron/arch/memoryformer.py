"""MemoryFormer: hash-table "memory layers" in place of fully-connected layers.

Ding et al., "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected
Layers", NeurIPS 2024, arXiv 2411.12992; the forward as coded in C0-Design/MemoryFormer
@59686737ec (memory_module/memory.py, megatron/model/transformer.py). Our own code.

Three registered layers:

- linear `memoryformer` (`MemoryFormerLinear`): y = sum_k s_k(x_k) T_k[code(x_k)] + b, the
  input cut into K = in_dim / tau chunks of tau bits (kernels/hash_lookup). Usable as any
  projection through `model.linear` or `make_linear`.
- mixer `memoryformer` (`MemoryFormerAttention`): causal attention whose q, k, v are memory
  layers and which has no output projection (the paper deletes it: `del_dense`).
- ffn `memoryformer` (`MemoryFormerFFN`): memory layer (dim -> K * (tau + extra_bits)) ->
  LayerNorm -> memory layer with tau + extra_bits bits per chunk (-> dim), as the official
  code's MemoryBlock (`mlp_expand_type: extra_bit`, `extra_bit = 2`).

Cost. A memory layer reads K rows of d_out: 2 K d_out FLOPs forward, about 1/tau of the
2 d_in d_out of a dense layer of the same shape, for 2^tau / tau times its parameters
(32x at tau = 8). The tables have the optimizer role "sparse": each step touches few
of their rows, so the optimizer routes them to AdamW with their own learning rate (the paper
raises it for this reason), and `clip_sparse_grads_` (arch/memory.py) clips them apart.

The block is pre-norm, as the official one is (megatron/model/transformer.py
`ParallelTransformerLayer.forward`: h = x + attn(LN1(x)); out = h + mlp(LN2(h)), the "residual
before the post-attention norm" being the usual pre-norm sum). The hash input is always the
layer input (`remove_projection: true`, as the shipped configs do).

Initialization, `init` on each config:
- neotron (default): tables N(0, std^2) truncated at 3 std, with std = model.init_std for
  q, k and the FFN's first layer and the depth-scaled out_std for v (it feeds the residual
  stream: there is no output projection) and the FFN's second layer; biases zero.
- reference (the official code): q, k, v tables N(0, 2 / (5 dim)) (GPT-NeoX `small_init`, the
  shipped configs' `init_method`, applied to the attention tables only); FFN tables and a bare
  memory layer's N(0, 0.02^2) (`MemoryLayer.__init__`); every bias N(0, 0.001^2).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.attention import Attention, AttentionConfig
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import FFNS, LINEARS, MIXERS, LayerConfig
from neotron.kernels.hash_lookup import hash_lookup

Score = Literal["l1", "paper"]
Init = Literal["neotron", "reference"]

INIT_DOC = (
    "neotron: tables N(0, std^2) truncated (std = model.init_std, depth-scaled where the layer"
    " feeds the residual stream), bias 0; reference: the official code's, tables N(0, 0.02^2)"
    " (q/k/v: N(0, 2/(5 dim)), NeoX small_init), bias N(0, 0.001^2)"
)
# The official constants (C0-Design/MemoryFormer@59686737ec memory_module/memory.py
# MemoryLayer.__init__: tables 0.02 * randn, bias 0.001 * randn).
REF_TABLE_STD = 0.02
REF_BIAS_STD = 0.001

SCORE_DOC = (
    "row weight: 'l1' = ||x_k||_1 * prod_j sigmoid(2|x_kj|), what the official code computes"
    " (default: its output scale follows the input's, like a linear layer's); 'paper' ="
    " prod_j sigmoid(2|x_kj|), the probability of the code, as the paper writes it"
)


# Optimizer roles of a module's parameters, read by neotron.optim.routing (a module attribute
# survives meta-device materialization and FSDP2, which replace the Parameter objects).
GROUPS_ATTR = "_neotron_param_groups"


class MemoryFormerLinearConfig(LayerConfig):
    type: Literal["memoryformer"] = "memoryformer"
    tau: int = Field(default=8, ge=1, le=16, description="bits per hash chunk; 2^tau rows per table")
    score: Score = Field(default="l1", description=SCORE_DOC)
    bias: bool = Field(default=True, description="add a bias (the official layer always has one)")
    impl: Literal["auto", "fast", "reference"] = "auto"
    init: Init = Field(default="neotron", description=INIT_DOC)


class TableLookup(nn.Module):
    """y = sum_k s_k(z_k) tables[k, code(z_k)] (+ bias), as a module with no parameters of its
    own (the tables and bias are its caller's): the seam where a tensor-parallel plan
    (neotron/arch/tp_plans.py) hands it the local shards (output columns, or hash groups)
    and adds the collectives. On one device it is the plain call."""

    def __init__(self, score: Score = "l1", impl: str = "auto") -> None:
        super().__init__()
        self.score, self.impl = score, impl

    def forward(self, z: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        y = hash_lookup(z, tables, score=self.score, impl=self.impl)
        return y if bias is None else y + bias


@LINEARS.register(MemoryFormerLinearConfig)
class MemoryFormerLinear(nn.Module):
    """A hash-table memory layer with the interface of a linear layer: [..., in] -> [..., out]."""

    _neotron_param_groups = {"tables": "sparse"}  # AdamW with its own lr (optim.sparse_lr)

    def __init__(self, in_dim: int, out_dim: int, *, cfg: MemoryFormerLinearConfig,
                 bias: bool = False) -> None:
        super().__init__()
        if in_dim % cfg.tau:
            raise ValueError(f"memoryformer linear: in_dim={in_dim} is not divisible by"
                             f" tau={cfg.tau}")
        self.cfg = cfg
        self.in_features, self.out_features = in_dim, out_dim
        self.tau = cfg.tau
        self.n_tables = in_dim // cfg.tau
        self.tables = nn.Parameter(torch.empty(self.n_tables, 2**cfg.tau, out_dim))
        self.bias = nn.Parameter(torch.empty(out_dim)) if (bias or cfg.bias) else None
        self.lookup = TableLookup(cfg.score, cfg.impl)

    def _sparse_tables(self) -> list[tuple[nn.Parameter, float | None]]:
        return [(self.tables, None)]  # clipped with the trainer's default limit

    def init_weights(self, std: float, *, table_std: float | None = None) -> None:
        """neotron: tables N(0, std^2) truncated at 3 std, bias 0. reference: tables
        N(0, table_std^2) (default 0.02, the official MemoryLayer's; the attention passes NeoX
        small_init's), bias N(0, 0.001^2); `std` is then unused."""
        if self.cfg.init == "reference":
            nn.init.normal_(self.tables, mean=0.0, std=table_std or REF_TABLE_STD)
            if self.bias is not None:
                nn.init.normal_(self.bias, mean=0.0, std=REF_BIAS_STD)
            return
        nn.init.trunc_normal_(self.tables, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Hash in fp32: bf16 rounding flips the signs of entries near zero, i.e. the codes.
        z = x.reshape(-1, shape[-1])
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        y = self.lookup(z, self.tables, self.bias)
        # -1, not out_features: under tensor parallelism a rank holds a slice of the outputs
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def flops_per_token(self, seq_len: int) -> float:
        # forward: K rows of `out` weighted and summed (2 K out); backward: the score
        # gradients <g, T_k[code]> (2 K out) and the table row gradients s_k g (2 K out).
        # Hashing, scores and the bias are elementwise: not counted (docs/accounting.md).
        return 6.0 * self.n_tables * self.out_features

    def active_params(self) -> dict[str, float]:
        """Of the tables, a token reads one row of each: n_tables rows of out_features."""
        return {"tables": float(self.n_tables * self.out_features)}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tau={self.tau},"
                f" tables={self.n_tables}x{2**self.tau}, score={self.cfg.score}")


# ---------------------------------------------------------------- the MemoryFormer block


class MemoryFormerAttentionConfig(AttentionConfig):
    """Attention with memory-layer q, k, v and no output projection (multi-head only)."""

    type: Literal["memoryformer"] = "memoryformer"  # type: ignore[assignment]
    tau: int = Field(default=8, ge=1, le=16)
    score: Score = Field(default="l1", description=SCORE_DOC)
    init: Init = Field(default="neotron", description=INIT_DOC)

    def check(self, dim: int) -> list[tuple[str, str]]:
        errors = super().check(dim)
        if self.n_kv_heads not in (None, self.n_heads):
            errors.append(("n_kv_heads", "memoryformer attention is multi-head: leave"
                           " n_kv_heads unset"))
        if (self.head_dim or dim // self.n_heads) * self.n_heads != dim:
            errors.append(("head_dim", f"n_heads * head_dim must equal model.dim={dim}: there"
                           " is no output projection"))
        if dim % self.tau:
            errors.append(("tau", f"model.dim={dim} is not divisible by tau={self.tau}"))
        return errors


@MIXERS.register(MemoryFormerAttentionConfig)
class MemoryFormerAttention(Attention):
    """Reuses Attention's forward (RoPE, SDPA, document masking) with hashed projections."""

    def __init__(self, ctx: BuildContext, *, cfg: MemoryFormerAttentionConfig) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.ctx = ctx
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or ctx.dim // cfg.n_heads
        lin = MemoryFormerLinearConfig(tau=cfg.tau, score=cfg.score, bias=True, init=cfg.init)
        width = self.n_heads * self.head_dim
        self.wq = MemoryFormerLinear(ctx.dim, width, cfg=lin)
        self.wk = MemoryFormerLinear(ctx.dim, width, cfg=lin)
        self.wv = MemoryFormerLinear(ctx.dim, width, cfg=lin)
        self.wo = nn.Identity()  # the paper deletes the attention output projection
        self.q_norm = None
        self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, ctx.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, ctx.norm_eps)

    def init_weights(self) -> None:
        # reference: the official q/k/v tables get the configs' init_method, NeoX small_init
        # N(0, 2 / (5 dim)) (megatron/model/transformer.py MySelfAttention.__init__,
        # megatron/model/init_functions.py small_init_init_method)
        small_init = (2 / (5 * self.ctx.dim)) ** 0.5
        self.wq.init_weights(self.ctx.init_std, table_std=small_init)
        self.wk.init_weights(self.ctx.init_std, table_std=small_init)
        # v feeds the residual stream directly (no output projection): depth-scaled init
        self.wv.init_weights(self.ctx.out_std, table_std=small_init)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()

    def flops_per_token(self, seq_len: int) -> float:
        proj = sum(m.flops_per_token(seq_len) for m in (self.wq, self.wk, self.wv))
        attn = 3 * 2 * 2 * self.n_heads * self.head_dim * (seq_len + 1) / 2
        return proj + attn


class MemoryFormerFFNConfig(LayerConfig):
    type: Literal["memoryformer"] = "memoryformer"
    tau: int = Field(default=8, ge=1, le=14)
    extra_bits: int = Field(default=2, ge=0, le=4,
                            description="the second layer hashes chunks of tau + extra_bits")
    score: Score = Field(default="l1", description=SCORE_DOC)
    init: Init = Field(default="neotron", description=INIT_DOC)

    def check(self, dim: int) -> list[tuple[str, str]]:
        if dim % self.tau:
            return [("tau", f"model.dim={dim} is not divisible by tau={self.tau}")]
        return []


@FFNS.register(MemoryFormerFFNConfig)
class MemoryFormerFFN(nn.Module):
    """memory layer -> LayerNorm -> memory layer (tau + extra_bits bits per chunk)."""

    def __init__(self, ctx: BuildContext, *, cfg: MemoryFormerFFNConfig) -> None:
        super().__init__()
        self.ctx = ctx
        K = ctx.dim // cfg.tau
        hidden = K * (cfg.tau + cfg.extra_bits)
        self.up = MemoryFormerLinear(ctx.dim, hidden, cfg=MemoryFormerLinearConfig(
            tau=cfg.tau, score=cfg.score, init=cfg.init))
        # LayerNorm, not RMSNorm: centring balances the signs the next layer hashes.
        self.norm = nn.LayerNorm(hidden, eps=ctx.norm_eps)
        self.down = MemoryFormerLinear(hidden, ctx.dim, cfg=MemoryFormerLinearConfig(
            tau=cfg.tau + cfg.extra_bits, score=cfg.score, init=cfg.init))

    def init_weights(self) -> None:
        self.up.init_weights(self.ctx.init_std)
        self.norm.reset_parameters()
        self.down.init_weights(self.ctx.out_std)

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        h = self.up(x)
        # in fp32 (the next layer hashes the signs), whatever the parameters' dtype
        h = F.layer_norm(h.float(), self.norm.normalized_shape, self.norm.weight.float(),
                         self.norm.bias.float(), self.norm.eps)
        return self.down(h).to(x.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        # the LayerNorm between them is elementwise: not counted (docs/accounting.md)
        return self.up.flops_per_token(seq_len) + self.down.flops_per_token(seq_len)

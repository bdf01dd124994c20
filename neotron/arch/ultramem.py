"""UltraMemV2 memory layers (FFN type `ultramem`).

Huang, Bao, Min et al., "UltraMemV2: Memory Networks Scaling to 120B Parameters with Superior
Long-Context Learning", arXiv 2508.18756; UltraMem v1: Huang et al., "Ultra-Sparse Memory
Network", ICLR 2025, arXiv 2411.12364. The forward follows the ByteDance release as read in
TRC-HPC/UltraMemV2-Ascend-Lossless-Optimizations@2ea5876e86 (olmo/ultramem_layer_v2.py,
`UltraMemLayerV2`; olmo/optim.py for the value lr). Our own code; docs/ultramem.md has the
table of where we depart from the release, and why.

For a token x (the FFN input, after the block's norm), per head h (H heads), with n keys per
side (an n x n grid of n^2 virtual slots), Tucker rank r, C Tucker cores, knn candidates per
side and K slots read:

    q_row, q_col = LN_q(W_q x)                 [H, 2, k]; LN over k, weight only
    S_row[i] = K_row[i] . q_row                [n, r]: K = LN_k(keys) [H, 2, n, r, k]
    S_col[j] = K_col[j] . q_col                [n, r]
    TDQKR:
      u, v = leading singular vectors of sum_c C_c (r x r per head), no gradient, one sign
             convention (sum(u) + sum(v) >= 0; u, v flip together, so u v^T is unchanged)
      I = top-knn_i (S_row[i] . u),  J = top-knn_j (S_col[j] . v)     pre-selection
      s_c(i, j) = S_row[i]^T C_c S_col[j]      exact, on the knn x knn grid I x J only
      top-K of sum_c s_c(i, j) over I x J  -> grid slots g = i n + j, their s_c
    implicit value expansion (virtual slot -> physical row of the shared pool):
      sigma = perm[g]                          a fixed permutation of the n^2 grid slots
      group = sigma // W,  row = (sigma % W + offset) % P
          W = n^2 / E physical rows per layer (E = `expand` virtual slots per row), P the
          pool's rows (P = W / share_ratio, shared by all ultramem layers of the model),
          offset = layer_idx * P // n_layers
    PEER-style value processing:
      p = <W_pre x, pre_values[row]>           (GELU(p) with `pre_gelu`)
      m[group] += sum_c-chunks  s_c * p * values[row]     the C cores weight C chunks of v
      out = W_o m                              m [E * v]: E blocks = E single projections
    + the parallel FFN (SwiGLU) on the same input: a memory layer in every block.

What the pre-selection guarantees: the rescoring is exact on I x J (tested against all n^2
pairs scored with the full cores, restricted to I x J). The K slots equal the exhaustive
top-K over all n^2 pairs when sum_c C_c = sigma u v^T is exactly rank 1 (sigma >= 0) and the
rank-1 factors S_row . u, S_col . v are non-negative (the product-key argument: the score is
then monotone in each factor); otherwise they may differ, as in the release.

The permutation is a buffer computed from `perm_seed` and the layer index with its own
generator, never the global RNG: every rank and every run builds the same one (the release
draws it from the global RNG and broadcasts it from rank 0 under FSDP). It is not
persistent: `init_weights` rebuilds it, so checkpoints carry no copy of it.

The value pool (`values` [P, v], `pre_values` [P, pre_dim]) is one Parameter pair shared by
all ultramem layers of a model with `share_values` (the release's `full_memory_layer`), routed
to the optimizer role "sparse" with `value_lr_scale` x the group's lr (release:
`mem_value_lr_times = 4`) through the module attribute `_neotron_lr_scale`.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import make_linear
from neotron.arch.memory import _model_under_construction
from neotron.arch.mlp import SwiGLU, SwiGLUConfig
from neotron.arch.registry import FFNS, LayerConfig
from neotron.kernels.embedding_bag import embedding_bag

Tensor = torch.Tensor

# LayerNorm eps of the query and key norms (OLMo's LayerNorm default).
LN_EPS = 1e-5


class UltraMemConfig(LayerConfig):
    type: Literal["ultramem"] = "ultramem"
    # --- table size
    n_keys: int = Field(default=64, ge=2,
                        description="keys per side: the layer's grid has n_keys^2 virtual slots")
    expand: int = Field(default=1, ge=1, description=(
        "virtual slots per physical row (release: mem_key_expand_time^2); > 1 gives W_o"
        " `expand` blocks, one linear projection per virtual copy of a row"))
    share_values: bool = Field(default=True, description=(
        "one value pool for all ultramem layers of the model (the release always shares)"))
    share_ratio: float = Field(default=0.5, gt=0, le=1, description=(
        "the layer's window of n_keys^2 / expand rows is this fraction of the shared pool"
        " (release: mem_share_ratio; README recipe 0.5)"))
    # --- activation density (what a token reads), independent of the table size
    heads: int = Field(default=1, gt=0, description="retrieval heads (release: mem_head)")
    knn: int = Field(default=32, gt=0, description="slots read per head (top-K)")
    candidates: int | None = Field(default=None, gt=0, description=(
        "rows and columns pre-selected per side (knn x knn grid rescored); None = knn"))
    # --- widths
    k_dim: int = Field(default=64, gt=0, description="query / key width per side and head")
    v_dim: int | None = Field(default=None, gt=0, description="value width; None = model.dim")
    pre_dim: int | None = Field(default=None, ge=0, description=(
        "pre-value width (PEER-style score <W_pre x, pre_values[row]>); None = v_dim, 0 = off"))
    pre_gelu: bool = Field(default=False, description=(
        "GELU on the pre-value score (release: mem_use_glu_act, default off)"))
    # --- Tucker decomposition
    tucker_rank: int = Field(default=2, ge=1, description="r: score components per key")
    tucker_cores: int = Field(default=2, ge=1, description=(
        "C cores (release: tucker_multihead); core c weights chunk c of each value"))
    # --- parameters, optimizer
    init: Literal["ultramem", "neotron"] = Field(default="ultramem", description=(
        "ultramem: the release's recipe (norm weights k^-0.4, W_q, keys N(0, 1/k), cores"
        " U(0, 1), values N(0, 0.02^2), W_o N(0, 1/(E v)), W_pre N(0, 1/dim)); neotron: the"
        " model's init_std / out_std, norm weights 1, keys U(+-1/sqrt(k)), cores U(0, 1)"))
    value_init_std: float = Field(default=0.02, gt=0, description="values and pre-values")
    value_lr_scale: float = Field(default=4.0, gt=0, description=(
        "lr multiplier of values and pre-values (release: mem_value_lr_times = 4)"))
    value_lr_decay_fraction: float | None = Field(default=None, gt=0, le=1, description=(
        "None: a constant value_lr_scale; a fraction f: the multiplier ramps linearly from"
        " value_lr_scale to 1 over the first f of the run's steps (release:"
        " mem_value_lr_max_steps_rate, 1.0 in its launch scripts)"))
    value_weight_decay: float = Field(default=0.0, ge=0, description=(
        "AdamW weight decay of values and pre-values (the 'sparse' role has 0; the release"
        " decays them with the run's weight decay)"))
    value_grad_clip: float | None = Field(default=None, ge=0, description=(
        "None: the pool is clipped with the dense parameters (the release: one global"
        " clip); a number: its own gradient-norm limit (0 = measured, not clipped)"))
    perm_seed: int = Field(default=0, description="seed of the virtual-slot permutations")
    parallel_ffn: SwiGLUConfig | None = Field(
        default_factory=SwiGLUConfig,
        description="FFN run beside the memory on the same input (its hidden_dim rebalances"
        " memory vs FFN compute); null = memory only")
    impl: Literal["auto", "fast", "reference"] = "auto"

    def cand(self) -> int:
        return self.candidates or self.knn

    def window(self) -> int:
        """Physical rows one layer addresses: n^2 / expand."""
        return self.n_keys**2 // self.expand

    def pool_rows(self) -> int:
        """Rows of the (shared) pool."""
        if not self.share_values:
            return self.window()
        return math.ceil(self.window() / self.share_ratio - 1e-9)

    def check(self, dim: int) -> list[tuple[str, str]]:
        errors = []
        if self.cand() > self.n_keys:
            key = "candidates" if self.candidates else "knn"
            errors.append((key, f"{self.cand()} candidates per side exceed n_keys={self.n_keys}"
                           + ("" if self.candidates else " (candidates defaults to knn)")))
        if self.knn > self.cand() ** 2:
            errors.append(("knn", f"knn={self.knn} exceeds the {self.cand()}^2 candidate grid"))
        if self.n_keys**2 % self.expand:
            errors.append(("expand", f"n_keys^2 = {self.n_keys**2} is not divisible by"
                           f" expand={self.expand}"))
        v = self.v_dim or dim
        if v % self.tucker_cores:
            errors.append(("tucker_cores", f"v_dim={v} is not divisible by tucker_cores="
                           f"{self.tucker_cores} (each core weights one chunk of a value)"))
        return errors


# ------------------------------------------------------------------------------ TDQKR


@torch.no_grad()
def rank1_factors(cores: Tensor) -> tuple[Tensor, Tensor]:
    """cores [C, H, r, r] -> (u, v) [H, r]: the leading singular vectors of sum_c C_c, in
    fp32 or wider, without gradient, oriented so that sum(u) + sum(v) >= 0 (u and v flip
    together: u v^T, the rank-1 approximation, is unchanged)."""
    core = cores.sum(0)
    core = core.to(torch.promote_types(core.dtype, torch.float32))
    U, _, Vh = torch.linalg.svd(core)
    u, v = U[..., :, 0], Vh[..., 0, :]
    sign = torch.where(u.sum(-1) + v.sum(-1) < 0, -1.0, 1.0).to(u.dtype).unsqueeze(-1)
    return u * sign, v * sign


def tdqkr(s_row: Tensor, s_col: Tensor, cores: Tensor, cand: int, knn: int
          ) -> tuple[Tensor, Tensor]:
    """Tucker-decomposed query-key retrieval.

    s_row, s_col [N, H, n, r] (score components), cores [C, H, r, r] ->
    (per-core scores s_c [N, H, knn, C], grid slots i * n + j [N, H, knn]), sorted by the
    total score sum_c s_c, descending. Candidates by the rank-1 approximation (no gradient);
    the scores are exact and differentiable in s_row, s_col and the cores."""
    n = s_col.shape[-2]
    u, v = rank1_factors(cores.detach())
    with torch.no_grad():  # (unsorted: the candidates' order does not matter, and is faster)
        i_cand = torch.einsum("thnr,hr->thn", s_row, u.to(s_row.dtype)).topk(
            cand, -1, sorted=False).indices
        j_cand = torch.einsum("thnr,hr->thn", s_col, v.to(s_col.dtype)).topk(
            cand, -1, sorted=False).indices
    r, C = s_row.shape[-1], cores.shape[0]
    a = s_row.gather(2, i_cand.unsqueeze(-1).expand(-1, -1, -1, r))  # [N, H, cand, r]
    b = s_col.gather(2, j_cand.unsqueeze(-1).expand(-1, -1, -1, r))
    # s_c(a, b) = a^T C_c b on the candidate grid, [N, H, C, cand, cand] (contiguous)
    ac = torch.einsum("thar,chrs->thcas", a, cores.to(a.dtype))
    grid = (ac @ b.unsqueeze(2).transpose(-1, -2)).flatten(3)  # [N, H, C, cand^2]
    best = grid.sum(2).topk(knn, dim=-1).indices  # [N, H, knn]
    per_core = grid.gather(3, best.unsqueeze(2).expand(-1, -1, C, -1)).transpose(2, 3)
    slots = i_cand.gather(2, best // cand) * n + j_cand.gather(2, best % cand)
    return per_core, slots


def virtual_slot_permutation(n_slots: int, seed: int) -> Tensor:
    """A fixed permutation of the grid slots, from its own generator (identical on every
    rank and in every process, whatever the global RNG state)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n_slots, generator=gen)


# Shared value pools, per model under construction (weak: a dropped model frees its entry).
_SHARED_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _normal_(proj: nn.Module, std: float) -> None:
    """N(0, std^2) for a dense projection (the release's plain normal); other projection
    types (quantized, Pattention, ...) keep their own init at that std."""
    if isinstance(proj, nn.Linear):
        nn.init.normal_(proj.weight, mean=0.0, std=std)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    else:
        proj.init_weights(std)


class PreScore(nn.Module):
    """PEER-style pre-value scores p[n, l] = <q[n], table[rows[n, l]]>, in fp32 or wider, as
    a module with no parameters (the table is passed in): the seam where a tensor-parallel
    plan gives it the local pre_dim shard of the table and of q and all-reduces the partial
    dot products. On one device it is the plain computation."""

    def forward(self, table: Tensor, rows: Tensor, q: Tensor) -> Tensor:
        wide = torch.promote_types(q.dtype, torch.float32)
        return torch.einsum("tld,td->tl", F.embedding(rows, table).to(wide), q.to(wide))


class PoolRead(nn.Module):
    """The value read m [N, expand * v] = sum_l w[n, l, c] * table[rows[n, l]] (chunk c of
    each row weighted by core c), placed in expansion block groups[n, l]; a module with no
    parameters (the table is passed in). The number of cores is w's last dimension and the
    chunk width is the table's width over it, so a tensor-parallel plan can hand it the local
    value-dim shard of the table with the weights of the cores whose chunks that shard holds
    (tp_plans.py); on one device it is every core and the whole table."""

    def __init__(self, expand: int, impl: str = "auto") -> None:
        super().__init__()
        self.expand, self.impl = expand, impl

    def forward(self, table: Tensor, rows: Tensor, groups: Tensor, w: Tensor) -> Tensor:
        (N, L, C), E = w.shape, self.expand
        P, V = table.shape
        # One weighted bag per (token, expansion group, core chunk) over the chunked table
        # table.view(P * C, V / C): row `row` chunk c is index row * C + c.
        idx = (rows.unsqueeze(-1) * C + torch.arange(C, device=rows.device))  # [N, L, C]
        idx = idx.permute(0, 2, 1).unsqueeze(1).expand(N, E, C, L)
        wb = w.permute(0, 2, 1).unsqueeze(1)  # [N, 1, C, L]
        if E > 1:
            onehot = groups.unsqueeze(1) == torch.arange(E, device=groups.device).view(1, E, 1)
            wb = wb * onehot.unsqueeze(2).to(wb.dtype)  # [N, E, C, L]
        else:
            wb = wb.expand(N, E, C, L)
        chunks = table.reshape(P * C, V // C)
        m = embedding_bag(chunks, idx.reshape(N * E * C, L),
                          wb.reshape(N * E * C, L).to(chunks.dtype), impl=self.impl)
        return m.view(N, E * V)


@FFNS.register(UltraMemConfig)
class UltraMem(nn.Module):
    # Optimizer roles and lr multipliers (module attributes: they survive meta-device
    # materialization and FSDP2, which replace the Parameter objects).
    _neotron_param_groups = {"values": "sparse", "pre_values": "sparse"}

    def __init__(self, ctx: BuildContext, *, cfg: UltraMemConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        dim = ctx.dim
        self.heads, self.knn, self.n_keys, self.cand = cfg.heads, cfg.knn, cfg.n_keys, cfg.cand()
        self.k_dim, self.rank, self.n_cores, self.expand = (
            cfg.k_dim, cfg.tucker_rank, cfg.tucker_cores, cfg.expand)
        self.v_dim = cfg.v_dim or dim
        self.pre_dim = self.v_dim if cfg.pre_dim is None else cfg.pre_dim
        self.window, self.pool = cfg.window(), cfg.pool_rows()
        self.offset = ctx.layer_idx * self.pool // ctx.n_layers if cfg.share_values else 0
        scale = (cfg.value_lr_scale if cfg.value_lr_decay_fraction is None
                 else (cfg.value_lr_scale, 1.0, cfg.value_lr_decay_fraction))
        self._neotron_lr_scale = {"values": scale, "pre_values": scale}
        if cfg.value_weight_decay > 0:
            self._neotron_weight_decay = {"values": cfg.value_weight_decay,
                                          "pre_values": cfg.value_weight_decay}

        H, k, r = cfg.heads, cfg.k_dim, cfg.tucker_rank
        self.query = make_linear(dim, H * 2 * k, ctx.linear)
        self.q_norm = nn.Parameter(torch.empty(k))
        self.k_norm = nn.Parameter(torch.empty(k))
        self.keys = nn.Parameter(torch.empty(H, 2, cfg.n_keys, r, k))
        self.cores = nn.Parameter(torch.empty(cfg.tucker_cores, H, r, r))
        self.values, self.pre_values = self._pool()
        self.pre = make_linear(dim, self.pre_dim, ctx.linear) if self.pre_dim else None
        self.wo = make_linear(cfg.expand * self.v_dim, dim, ctx.linear)
        self.register_buffer("perm", torch.empty(cfg.n_keys**2, dtype=torch.long),
                             persistent=False)
        # Parameter-free seams over the pool (tables passed in): tp_plans.py shards there.
        self.pre_score = PreScore() if self.pre_dim else None
        self.read = PoolRead(cfg.expand, cfg.impl)
        self.ffn = SwiGLU(ctx, cfg=cfg.parallel_ffn) if cfg.parallel_ffn is not None else None

    def _pool(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """New pool tables, or the first sharing ultramem layer's of the same model."""
        model = _model_under_construction() if self.cfg.share_values else None
        shared = _SHARED_POOLS.setdefault(model, {}) if model is not None else {}
        owner = shared.setdefault((self.pool, self.v_dim, self.pre_dim), self)
        object.__setattr__(self, "_pool_owner", owner)  # a reference, not a submodule
        if owner is not self:
            return owner.values, owner.pre_values
        pre = nn.Parameter(torch.empty(self.pool, self.pre_dim)) if self.pre_dim else None
        return nn.Parameter(torch.empty(self.pool, self.v_dim)), pre

    # ---------------------------------------------------------------- init

    def _sparse_tables(self) -> list[tuple[nn.Parameter, float | None]]:
        """The pool, for `neotron.arch.memory.clip_sparse_grads_`; none with
        value_grad_clip None (then the trainer's global clip covers it, as in the release)."""
        limit = self.cfg.value_grad_clip
        if limit is None:
            return []
        tables = [t for t in (self.values, self.pre_values) if t is not None]
        return [(t, limit if limit > 0 else math.inf) for t in tables]

    def init_weights(self) -> None:
        cfg, k = self.cfg, self.k_dim
        with torch.no_grad():
            perm = virtual_slot_permutation(self.n_keys**2, cfg.perm_seed + self.ctx.layer_idx)
            self.perm.copy_(perm.to(self.perm.device))
        if cfg.init == "ultramem":
            nn.init.constant_(self.q_norm, k**-0.4)
            nn.init.constant_(self.k_norm, k**-0.4)
            _normal_(self.query, k**-0.5)
            nn.init.normal_(self.keys, mean=0.0, std=k**-0.5)
            _normal_(self.wo, (self.expand * self.v_dim) ** -0.5)
            if self.pre is not None:
                _normal_(self.pre, self.ctx.dim**-0.5)
        else:
            nn.init.ones_(self.q_norm)
            nn.init.ones_(self.k_norm)
            self.query.init_weights(self.ctx.init_std)
            nn.init.uniform_(self.keys, -(k**-0.5), k**-0.5)
            self.wo.init_weights(self.ctx.out_std)
            if self.pre is not None:
                self.pre.init_weights(self.ctx.init_std)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        owner = self._pool_owner
        if owner is not self:
            # to_empty gave this module new Parameters: tie again to the owner's (an earlier
            # layer, initialized before us).
            self.values, self.pre_values = owner.values, owner.pre_values
        else:
            nn.init.normal_(self.values, mean=0.0, std=cfg.value_init_std)
            if self.pre_values is not None:
                nn.init.normal_(self.pre_values, mean=0.0, std=cfg.value_init_std)
        if self.ffn is not None:
            self.ffn.init_weights()

    # ---------------------------------------------------------------- forward

    def physical(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Grid slots -> (physical pool rows, expansion groups in [0, expand))."""
        sigma = self.perm[slots]
        return (sigma % self.window + self.offset) % self.pool, sigma // self.window

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, dim] -> (per-core scores [N, H, knn, C] fp32 or wider, grid slots [N, H, knn])."""
        N, H, k = x.shape[0], self.heads, self.k_dim
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q = self.query(x).to(wide).view(N, H, 2, k)
            q = F.layer_norm(q, (k,), self.q_norm.to(wide), None, LN_EPS)
            keys = F.layer_norm(self.keys.to(wide), (k,), self.k_norm.to(wide), None, LN_EPS)
            s = torch.einsum("thsk,hsnrk->thsnr", q, keys)  # [N, H, 2, n, r]
            return tdqkr(s[:, :, 0], s[:, :, 1], self.cores.to(wide), self.cand, self.knn)

    def readout(self, x: Tensor, scores: Tensor, slots: Tensor) -> Tensor:
        """Implicit value expansion + PEER-style value processing, before W_o:
        m [N, expand * v_dim] = sum over read slots of s_c * p * values[row] (chunk c), placed
        in the slot's expansion block."""
        N = x.shape[0]
        C, L = self.n_cores, self.heads * self.knn
        rows, groups = self.physical(slots.view(N, L))
        w = scores.reshape(N, L, C)
        if self.pre is not None:
            p = self.pre_score(self.pre_values, rows, self.pre(x))  # [N, L]
            if self.cfg.pre_gelu:
                p = F.gelu(p)
            w = w * p.unsqueeze(-1)
        return self.read(self.values, rows, groups, w)

    def forward(self, x: Tensor, seq: SeqInfo) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        scores, slots = self.lookup(xf)
        m = self.readout(xf, scores, slots)
        out = self.wo(m.to(x.dtype)).view(shape)
        if self.ffn is not None:
            out = out + self.ffn(x, seq)
        return out

    # ---------------------------------------------------------------- cost

    def active_params(self) -> dict[str, float]:
        """Of the shared pool, a token reads heads x knn rows of values and of pre-values
        (neotron.arch.accounting adds up the reads of every layer sharing the pool)."""
        reads = {"values": float(self.heads * self.knn * self.v_dim)}
        if self.pre_values is not None:
            reads["pre_values"] = float(self.heads * self.knn * self.pre_dim)
        return reads

    def flops_per_token(self, seq_len: int) -> float:
        H, n, r, k, C = self.heads, self.n_keys, self.rank, self.k_dim, self.n_cores
        c, K, v, pd = self.cand, self.knn, self.v_dim, self.pre_dim
        # Matmul-like work only (docs/accounting.md): LayerNorms, GELU and the top-k
        # selections are elementwise or comparisons, not counted.
        # Score components: 2 sides x n keys x r components x k MACs per head, x3 with the
        # backward (the keys' LayerNorm is per step, not per token).
        scoring = 3 * 2 * H * 2 * n * r * k
        # Pre-selection (forward only, no gradient): the rank-1 projections of both sides.
        select = H * 2 * 2 * n * r
        # Exact rescoring of the c x c grid with C cores (a C_c: c r^2, then . b: c^2 r MACs),
        # x3 with the backward.
        rescoring = 3 * 2 * H * C * (c * r * r + c * c * r)
        # Pre-value scores: K rows of pd per head (gather-dot), x3.
        pre = 6 * H * K * pd
        # Value reads: K rows of v per head forward, the weights' and rows' gradients backward.
        values = 6 * H * K * v
        total = self.query.flops_per_token(seq_len) + scoring + select + rescoring + pre + values
        if self.pre is not None:
            total += self.pre.flops_per_token(seq_len)
        total += self.wo.flops_per_token(seq_len)
        if self.ffn is not None:
            total += self.ffn.flops_per_token(seq_len)
        return float(total)

    def extra_repr(self) -> str:
        return (f"grid={self.n_keys}^2, pool={self.pool} (window {self.window}, offset"
                f" {self.offset}), heads={self.heads}, knn={self.knn}, candidates={self.cand},"
                f" k_dim={self.k_dim}, v_dim={self.v_dim}, pre_dim={self.pre_dim},"
                f" tucker r={self.rank} x {self.n_cores} cores, expand={self.expand}")

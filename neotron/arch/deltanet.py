"""DeltaNet and Gated DeltaNet sequence mixers.

- DeltaNet: Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence
  Length", arXiv 2406.06484 (layer design in section 4: short convolutions, SiLU, L2-normalized
  q/k, sigmoid beta, per-head output norm).
- Gated DeltaNet: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
  Rule", arXiv 2412.06464: adds the Mamba2-style decay alpha_t = exp(g_t),
  g_t = -exp(A_log) * softplus(W_a x_t + dt_bias), and an output gate.
- allow_neg_eigval (beta in (0, 2)): Grazzi et al., "Unlocking State-Tracking in Linear RNNs
  Through Negative Eigenvalues", arXiv 2411.12537.

Per head, with state S in R^{d_k x d_v} (the kernels in neotron.kernels hold the math):

    q_t, k_t, v_t = SiLU(conv(W_q x)), SiLU(conv(W_k x)), SiLU(conv(W_v x)); q, k L2-normalized
    beta_t = sigmoid(W_b x_t)                (x2 with allow_neg_eigval)
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T     (g = 0: DeltaNet)
    o_t = S_t^T q_t / sqrt(d_k)
    y_t = W_o [RMSNorm(o_t) * (SiLU(W_g x_t) if use_gate)]

Initialization: short convs N(0, init_std) as fla's models (`conv_init: normal`; measured
better than nn.Conv1d's U(+-1/sqrt(K)), `conv_init: uniform`); projections N(0, init_std)
truncated with W_o depth-scaled, or with `init: reference` as fla's models (every projection,
W_o included, N(0, init_std) untruncated). The fla / paper shape is head_dim 256, expand_v 2,
n_heads = 0.75 dim / 256. docs/mixers.md compares the recipes, with the measurements.

Training uses the chunked kernels (fla's Triton kernels on CUDA in bf16 when installed);
decoding uses `step`, the recurrence one token at a time. With document masking
(`seq.doc_ids`), the batch goes to the kernels as one packed row with `cu_seqlens`, so the
state restarts at every document, and the short convolutions are masked the same way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.conv import ShortConv
from neotron.arch.linear import DenseLinear, make_linear
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import MIXERS, LayerConfig
from neotron.kernels.delta_rule import delta_rule
from neotron.kernels.gated_delta_rule import gated_delta_rule

Tensor = torch.Tensor

# eps inside the L2 norm: x / sqrt(sum x^2 + eps), smooth at 0 (fla uses the same form).
L2_EPS = 1e-6


class DeltaNetConfig(LayerConfig):
    type: Literal["deltanet"] = "deltanet"
    n_heads: int = Field(default=8, gt=0)
    head_dim: int | None = Field(default=None, gt=0, description="d_k; None = dim // n_heads")
    expand_v: float = Field(default=1.0, gt=0, description="d_v = head_dim * expand_v")
    conv_size: int = Field(default=4, ge=0, description="short causal conv kernel; 0 = none")
    allow_neg_eigval: bool = Field(default=False, description="beta in (0, 2) instead of (0, 1)")
    use_gate: bool = Field(default=False, description="output gate SiLU(W_g x) after the norm")
    chunk_size: int = Field(default=64, gt=0, description="chunk of the PyTorch chunked kernel")
    impl: Literal["auto", "chunked", "reference", "fla"] = Field(
        default="auto", description="kernel path (auto: fla on CUDA in bf16/fp16, else chunked)"
    )
    init: Literal["neotron", "reference"] = Field(
        default="neotron",
        description="projections: neotron = N(0, init_std) truncated at 3 std, W_o depth-scaled"
        " (out_std); reference = fla's models, every projection (W_o included) N(0, init_std)"
        " untruncated (initializer_range 0.02)",
    )
    conv_init: Literal["normal", "uniform"] = Field(
        default="normal",
        description="short convs: normal = N(0, init_std), fla's re-init (default: measured"
        " better, docs/mixers.md); uniform = U(+-1/sqrt(K)), nn.Conv1d's own (the default"
        " before issue #9)",
    )

    def dims(self, dim: int) -> tuple[int, int]:
        """(d_k, d_v) per head."""
        dk = self.head_dim or dim // self.n_heads
        return dk, int(round(dk * self.expand_v))

    def check(self, dim: int) -> list[tuple[str, str]]:
        """Problems that depend on the model width, as (key, message) pairs."""
        errors = []
        if self.head_dim is None and dim % self.n_heads:
            errors.append(("n_heads", f"model.dim={dim} is not divisible by n_heads={self.n_heads}"))
        dk = self.head_dim or max(1, dim // self.n_heads)
        if abs(dk * self.expand_v - round(dk * self.expand_v)) > 1e-9:
            errors.append(
                ("expand_v", f"head_dim * expand_v = {dk} * {self.expand_v} is not an integer")
            )
        return errors


class GatedDeltaNetConfig(DeltaNetConfig):
    type: Literal["gated_deltanet"] = "gated_deltanet"  # type: ignore[assignment]
    use_gate: bool = Field(default=True, description="output gate SiLU(W_g x) after the norm")


def init_normal(proj: nn.Module, std: float) -> None:
    """Untruncated N(0, std^2) for a dense projection's weight and a zero bias (the official
    recipes' nn.init.normal_); other projection types (BitNet, FP4, Pattention, ...) keep their
    own init at that std."""
    if type(proj) in (DenseLinear, nn.Linear):
        nn.init.normal_(proj.weight, mean=0.0, std=std)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    else:
        proj.init_weights(std)


def _wide(x: Tensor) -> Tensor:
    """x in fp32, or fp64 if it is fp64 (tests compare paths in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def l2_normalize(x: Tensor) -> Tensor:
    """L2 norm over the head dim, computed in fp32 (bf16 here destabilizes the chunked solve,
    fla PR #806), returned in x's dtype."""
    xf = _wide(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


@MIXERS.register(DeltaNetConfig)
class DeltaNet(nn.Module):
    gated = False

    def __init__(self, ctx: BuildContext, *, cfg: DeltaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        H = self.n_heads = cfg.n_heads
        self.dk, self.dv = cfg.dims(ctx.dim)
        lin = ctx.linear
        self.wq = make_linear(ctx.dim, H * self.dk, lin)
        self.wk = make_linear(ctx.dim, H * self.dk, lin)
        self.wv = make_linear(ctx.dim, H * self.dv, lin)
        self.wb = make_linear(ctx.dim, H, lin)  # beta
        self.wa = make_linear(ctx.dim, H, lin) if self.gated else None  # decay input
        self.wg = make_linear(ctx.dim, H * self.dv, lin) if cfg.use_gate else None
        self.wo = make_linear(H * self.dv, ctx.dim, lin)
        if cfg.conv_size:
            self.q_conv = ShortConv(H * self.dk, cfg.conv_size)
            self.k_conv = ShortConv(H * self.dk, cfg.conv_size)
            self.v_conv = ShortConv(H * self.dv, cfg.conv_size)
        else:
            self.q_conv = self.k_conv = self.v_conv = None
        self.o_norm = RMSNorm(self.dv, ctx.norm_eps)  # per head, weights shared across heads
        if self.gated:
            # fp32 whatever the model dtype: exp(A_log) and softplus(. + dt_bias) set the decay.
            self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
            self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
            # AdamW without weight decay (neotron.optim.routing reads this module attribute; it
            # survives meta-device materialization and FSDP2, which replace the Parameters).
            self._neotron_param_groups = {"A_log": "no_decay", "dt_bias": "no_decay"}

    # ------------------------------------------------------------------ init

    def _projections(self) -> list[nn.Module]:
        return [m for m in (self.wq, self.wk, self.wv, self.wb, self.wa, self.wg) if m is not None]

    def _convs(self) -> list[ShortConv]:
        return [c for c in (self.q_conv, self.k_conv, self.v_conv) if c is not None]

    def init_weights(self) -> None:
        std = self.ctx.init_std
        if self.cfg.init == "reference":
            # fla (fla-org/flash-linear-attention@bc3b101dcb, fla/models/{delta_net,
            # gated_deltanet}/modeling_*.py `_init_weights`, prenorm_residual_strategy None):
            # every nn.Linear N(0, initializer_range), no depth scaling.
            for proj in (*self._projections(), self.wo):
                init_normal(proj, std)
        else:
            for proj in self._projections():
                proj.init_weights(std)
            self.wo.init_weights(self.ctx.out_std)
        # fla re-initializes every nn.Conv1d (ShortConvolution is one) to N(0, initializer_range)
        for conv in self._convs():
            conv.init_weights(std if self.cfg.conv_init == "normal" else None)
        self.o_norm.init_weights()
        if self.gated:
            with torch.no_grad():
                # Gated DeltaNet / Mamba2 init: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1]
                # (floored at 1e-4), stored as its inverse softplus so softplus(dt_bias) = dt.
                A = torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-6)
                self.A_log.copy_(A.log())
                lo, hi = math.log(1e-3), math.log(0.1)
                dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(lo, hi)).clamp_min(1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # --------------------------------------------------------------- forward

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """beta [..., H] and the log decay g [..., H] (fp32) or None."""
        beta = _wide(self.wb(x)).sigmoid()
        if self.cfg.allow_neg_eigval:
            beta = beta * 2.0
        g = None
        if self.gated:
            a = _wide(self.wa(x))
            g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        return beta, g

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o [..., H, d_v] -> norm, gate, output projection."""
        # RMSNorm per head in fp32 (fp64 kept), weights shared across heads.
        w = self.o_norm.weight
        o = F.rms_norm(_wide(o), (self.dv,), _wide(w), self.o_norm.eps).to(o.dtype)
        if self.wg is not None:
            o = o * F.silu(self.wg(x).view(o.shape))
        return self.wo(o.flatten(-2))

    def forward(self, x: Tensor, seq: SeqInfo) -> Tensor:
        return self._mix(x, seq)[0]

    def _mix(self, x: Tensor, seq: SeqInfo, final: bool = False
             ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        """(y, the kernel's final state S if `final`, the pre-conv q, k, v projections)."""
        B, T, _ = x.shape
        doc = seq.doc_ids
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        pre = (q, k, v)
        if self.q_conv is not None:
            q, k, v = self.q_conv(q, doc), self.k_conv(k, doc), self.v_conv(v, doc)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        # Local head count from the projection width (tensor parallelism may shard heads).
        q = l2_normalize(q.view(B, T, -1, self.dk))
        k = l2_normalize(k.view(B, T, -1, self.dk))
        v = v.view(B, T, -1, self.dv)
        beta, g = self._gates(x)
        beta = beta.to(v.dtype)  # fla's kernels want q, k, v, beta in one dtype
        cu = seq.cu_seqlens
        if cu is not None:  # documents: one packed row, the state restarts at each boundary
            q, k, v, beta = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, beta))
            g = None if g is None else g.reshape(1, B * T, -1)
        kw: dict[str, Any] = dict(cu_seqlens=cu, chunk_size=self.cfg.chunk_size, impl=self.cfg.impl,
                                  output_final_state=final)
        if g is None:
            o, S = delta_rule(q, k, v, beta, **kw)
        else:
            o, S = gated_delta_rule(q, k, v, g, beta, **kw)
        return self._output(o.reshape(B, T, -1, self.dv), x), S, pre

    def prefill(self, x: Tensor, seq: SeqInfo) -> tuple[Tensor, dict[str, Tensor]]:
        """The prompt (one document per row) through the chunked kernel: (y [B, T, dim], the
        `step` state after it: the kernel's final S and each conv's last inputs)."""
        y, S, pre = self._mix(x, seq, final=True)
        state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        state["S"] = S.to(state["S"].dtype)
        for name, conv, p in zip("qkv", (self.q_conv, self.k_conv, self.v_conv), pre):
            if conv is not None:
                state[f"conv_{name}"] = conv.state_after(p)
        return y, state

    # -------------------------------------------------------------- decoding

    def init_state(self, batch: int, *, device=None, dtype=None) -> dict[str, Tensor]:
        """Decoding state at the start of a sequence: the delta-rule memory S [B, H, d_k, d_v]
        (fp32, fp64 for fp64 models) and the last conv_size-1 inputs of each convolution."""
        dtype = dtype or self.o_norm.weight.dtype
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        state = {"S": torch.zeros(batch, self.n_heads, self.dk, self.dv, device=device, dtype=sdt)}
        for name, conv in (("q", self.q_conv), ("k", self.k_conv), ("v", self.v_conv)):
            if conv is not None:
                state[f"conv_{name}"] = conv.init_state(batch, device=device, dtype=dtype)
        return state

    def step(self, x_t: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One decoding step: x_t [B, dim] -> (y_t [B, dim], new state). The recurrence is the
        kernels' token-by-token reference, so this agrees with `forward` token by token."""
        B = x_t.shape[0]
        new: dict[str, Tensor] = {}
        q, k, v = self.wq(x_t), self.wk(x_t), self.wv(x_t)
        if self.q_conv is not None:
            q, new["conv_q"] = self.q_conv.step(q, state["conv_q"])
            k, new["conv_k"] = self.k_conv.step(k, state["conv_k"])
            v, new["conv_v"] = self.v_conv.step(v, state["conv_v"])
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_normalize(q.view(B, 1, -1, self.dk))
        k = l2_normalize(k.view(B, 1, -1, self.dk))
        v = v.view(B, 1, -1, self.dv)
        beta, g = self._gates(x_t[:, None])
        beta = beta.to(v.dtype)
        kw: dict[str, Any] = dict(initial_state=state["S"], output_final_state=True, impl="reference")
        if g is None:
            o, new["S"] = delta_rule(q, k, v, beta, **kw)
        else:
            o, new["S"] = gated_delta_rule(q, k, v, g, beta, **kw)
        return self._output(o[:, 0], x_t), new

    # ----------------------------------------------------------------- FLOPs

    def recurrence_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) of the chunked delta rule per token,
        all heads, counted as the chunked algorithm computes it (C = chunk_size, a sequence
        padded to whole chunks). Per chunk and head, forward:
            K K^T and Q K^T (full C x C blocks)           4 C^2 d_k
            unit-triangular solve for [W | U]             C (C - 1) (d_k + d_v)
            U - W S, S + K^T u, Q S                       3 * 2 C d_k d_v
            (Q K^T masked) u                              2 C^2 d_v
        Elementwise work (gates, decays, masks) is not counted, as for attention's softmax.
        Measured autograd work differs at the ends of a sequence (no gradient into the zero
        initial state or out of the last state: up to 8 C d_k d_v less per head and sequence)
        and in the solve's backward (torch forms the full C x C gradient of the triangle, C^2
        (d_k + d_v) more); docs/accounting.md has the measured ratios."""
        C = self.cfg.chunk_size
        dk, dv = self.dk, self.dv
        per_chunk = 6 * C * dk * dv + 4 * C * C * dk + C * (C - 1) * (dk + dv) + 2 * C * C * dv
        n_chunks = max(1, -(-seq_len // C))
        return 3.0 * self.n_heads * n_chunks * per_chunk / seq_len

    def flops_per_token(self, seq_len: int) -> float:
        proj = sum(m.flops_per_token(seq_len) for m in (*self._projections(), self.wo))
        conv = sum(c.flops_per_token() for c in self._convs())
        return proj + conv + self.recurrence_flops_per_token(seq_len)


@MIXERS.register(GatedDeltaNetConfig)
class GatedDeltaNet(DeltaNet):
    gated = True

"""Causal grouped-query attention with RoPE, through scaled_dot_product_attention."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import make_linear
from neotron.arch.norm import RMSNorm
from neotron.arch.registry import MIXERS, LayerConfig
from neotron.arch.rope import apply_rope, rope_angles


class AttentionConfig(LayerConfig):
    type: Literal["attention"] = "attention"
    n_heads: int = Field(default=8, gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="None = n_heads (MHA)")
    head_dim: int | None = Field(default=None, gt=0, description="None = dim // n_heads")
    rope_theta: float = Field(default=10000.0, gt=0)
    qk_norm: bool = False
    bias: bool = False

    def check(self, dim: int) -> list[tuple[str, str]]:
        """Problems that depend on the model width, as (key, message) pairs."""
        errors = []
        if self.head_dim is None and dim % self.n_heads:
            errors.append(("n_heads", f"model.dim={dim} is not divisible by n_heads={self.n_heads}"))
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            errors.append(("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}"))
        hd = self.head_dim or dim // self.n_heads
        if hd % 2:
            errors.append(("head_dim", f"head_dim={hd} must be even for RoPE"))
        return errors


@MIXERS.register(AttentionConfig)
class Attention(nn.Module):
    def __init__(self, ctx: BuildContext, *, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or ctx.dim // cfg.n_heads
        self.wq = make_linear(ctx.dim, self.n_heads * self.head_dim, ctx.linear, bias=cfg.bias)
        self.wk = make_linear(ctx.dim, self.n_kv_heads * self.head_dim, ctx.linear, bias=cfg.bias)
        self.wv = make_linear(ctx.dim, self.n_kv_heads * self.head_dim, ctx.linear, bias=cfg.bias)
        self.wo = make_linear(self.n_heads * self.head_dim, ctx.dim, ctx.linear, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, ctx.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, ctx.norm_eps) if cfg.qk_norm else None

    def init_weights(self) -> None:
        for proj in (self.wq, self.wk, self.wv):
            proj.init_weights(self.ctx.init_std)
        self.wo.init_weights(self.ctx.out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v as [B, heads, T, head_dim], q and k normed (qk_norm) and rotated."""
        B, T, _ = x.shape
        # The local head count is inferred from the projection's width, never from dim, so
        # the same code runs when tensor parallelism shards the heads across ranks.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_angles(positions, self.head_dim, self.cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, seq.positions)
        gqa = q.shape[1] != k.shape[1]
        if seq.doc_ids is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            same_doc = seq.doc_ids[:, None, :, None] == seq.doc_ids[:, None, None, :]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=same_doc & causal, enable_gqa=gqa)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    # -------------------------------------------------------------- decoding

    def prefill(self, x: torch.Tensor, seq: SeqInfo) -> tuple[torch.Tensor, dict]:
        """The prompt in the parallel form: (y [B, T, dim], KV cache {"k", "v"}: the rotated
        keys and the values, [B, kv_heads, T, head_dim]; GQA keeps the kv heads unrepeated)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, seq.positions)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(o.transpose(1, 2).reshape(B, T, -1)), {"k": k, "v": v}

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One token x_t [B, dim] at position = the cache length; it attends to every cached
        key and itself (no mask needed)."""
        B = x_t.shape[0]
        pos = torch.tensor([state["k"].shape[2]], device=x_t.device)
        q, k, v = self._qkv(x_t[:, None], pos)
        k = torch.cat([state["k"], k], dim=2)
        v = torch.cat([state["v"], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(o.reshape(B, -1)), {"k": k, "v": v}

    def flops_per_token(self, seq_len: int) -> float:
        proj = sum(m.flops_per_token(seq_len) for m in (self.wq, self.wk, self.wv, self.wo))
        # QK^T and AV: 2 matmuls x 2 flops x head_dim x heads per attended key; a causal
        # token attends (seq_len + 1) / 2 keys on average. x3 for forward + backward.
        attn = 3 * 2 * 2 * self.n_heads * self.head_dim * (seq_len + 1) / 2
        return proj + attn

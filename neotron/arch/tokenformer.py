"""TokenFormer's Pattention: input tokens attend to learnable parameter tokens.

Wang et al., "TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters",
ICLR 2025, arXiv 2410.23168; math as coded in Haiyang-W/TokenFormer@4d56c73f40
(megatron/model/tokenformer.py `Pattention`). Our own code.

For inputs X [N, d_in], key tokens K_P [n, d_in] and value tokens V_P [n, d_out]:

    A = X K_P^T                                   (no 1/sqrt(d): scale 1, as the code)
    l2_norm_gelu (default):  Theta(A) = GeLU(A * sqrt(n_s) / ||A_i||_2)     row-wise
    gelu_l2_norm:            Theta(A) = GeLU(A) * sqrt(n_s) / ||GeLU(A)_i||_2
    softmax:                 Theta(A) = exp(A) / sum_j exp(A_ij) * n_s
    Pattention(X) = Theta(A) V_P

n_s is the normalization's token count: `norm_n`, or the current n when unset. Growth
(`neotron grow`, neotron/grow.py) appends parameter tokens with zero keys: their scores are
0, GeLU(0) = 0, so they add nothing, and ||A_i|| is unchanged; with n_s frozen at the old n
the grown layer computes exactly the old function (the official code's sqrt(n) would become
sqrt(n + m) and rescale every output).

Registered as linear `pattention` (any projection, through `model.linear` or `make_linear`)
and as FFN `pattention` (a single Pattention dim -> dim with `n_tokens` tokens and no extra
activation, TokenFormer's FFN).

Initialization, `init` on each config:
- neotron (default): values N(0, std^2) truncated at 3 std, with the std the block passes
  (model.init_std; the depth-scaled out_std for the attention output and the FFN); keys
  N(0, model.init_std^2) truncated in every layer. Theta is invariant to the keys' scale,
  which only sets their effective learning rate under Adam: the attention output's keys used
  to get its depth-scaled std (sqrt(2 n_layers) times faster relative updates than the FFN's
  keys); one std for all keys measured better (docs/memory_layers.md).
- reference (the official code, megatron/model/tokenformer.py `Pattention.__init__` with the
  shipped configs' `init_method: normal`, `output_layer_init_method: wang_init`): every key
  N(0, init_std^2) (NeoX init_method_std 0.02) and every value, q/k/v included,
  N(0, (2 / (n_layers sqrt(dim)))^2), untruncated.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.registry import FFNS, LINEARS, LayerConfig

Norm = Literal["l2_norm_gelu", "gelu_l2_norm", "softmax"]
NORM_EPS = 1e-6  # the code divides by ||A_i|| with no guard; fp16 rows can reach 0

Init = Literal["neotron", "reference"]
INIT_DOC = ("neotron: keys N(0, init_std^2), values N(0, std^2) with the block's std"
            " (depth-scaled for output projections), truncated; reference (official TokenFormer):"
            " keys N(0, init_std^2), all values wang_init N(0, (2 / (n_layers sqrt(dim)))^2),"
            " untruncated")

NORM_N_DOC = ("the n in the normalization's sqrt(n) (n for softmax); None = n_tokens. Set to"
              " the parent's n after growth so the grown model computes the same function")


def pattention_norm(a: torch.Tensor, kind: Norm, norm_n: int) -> torch.Tensor:
    """Theta(A) over the last dim, in fp32 or wider whatever A's dtype."""
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    if kind == "l2_norm_gelu":
        return F.gelu(F.normalize(a, dim=-1, eps=NORM_EPS) * math.sqrt(norm_n))
    if kind == "gelu_l2_norm":
        return F.normalize(F.gelu(a), dim=-1, eps=NORM_EPS) * math.sqrt(norm_n)
    if kind == "softmax":
        return a.softmax(dim=-1) * norm_n
    raise ValueError(f"unknown Pattention norm {kind!r}")


class PattentionConfig(LayerConfig):
    type: Literal["pattention"] = "pattention"
    n_tokens: int | None = Field(default=None, gt=0,
                                 description="parameter tokens; None = the input width")
    norm: Norm = "l2_norm_gelu"
    norm_n: int | None = Field(default=None, gt=0, description=NORM_N_DOC)
    init: Init = Field(default="neotron", description=INIT_DOC)


@dataclass(frozen=True)
class ModelShape:
    """What the reference init needs to know about the model: wang_init's depth and width,
    and the std of the keys (NeoX's init_method_std is model.init_std)."""

    n_layers: int
    dim: int
    init_std: float

    @property
    def wang_std(self) -> float:
        # GPT-NeoX megatron/model/init_functions.py wang_init_method: 2 / n_layers / sqrt(dim)
        return 2.0 / self.n_layers / math.sqrt(self.dim)


def _enclosing_shape() -> ModelShape | None:
    """The model shape of the block whose constructor is building this projection: the
    `ctx` (BuildContext) argument of a frame up the call stack. `make_linear` receives only
    the projection's config, and the reference init needs the model's depth and width; a
    Pattention built outside a block has none (its owner then sets `model_shape`)."""
    frame = sys._getframe(1)
    while frame is not None:
        ctx = frame.f_locals.get("ctx")
        if isinstance(ctx, BuildContext):
            return ModelShape(ctx.n_layers, ctx.dim, ctx.init_std)
        frame = frame.f_back
    return None


@LINEARS.register(PattentionConfig)
class Pattention(nn.Module):
    """[..., in] -> [..., out] through n learnable key/value parameter tokens."""

    def __init__(self, in_dim: int, out_dim: int, *, cfg: PattentionConfig | PattentionFFNConfig,
                 bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_features, self.out_features = in_dim, out_dim
        self.n_tokens = cfg.n_tokens or in_dim
        self.norm_n = cfg.norm_n or self.n_tokens
        self.keys = nn.Parameter(torch.empty(self.n_tokens, in_dim))
        self.values = nn.Parameter(torch.empty(self.n_tokens, out_dim))
        # TokenFormer has no bias; one is added only when a block asks for biased projections.
        self.bias = nn.Parameter(torch.empty(out_dim)) if bias else None
        # The model's depth, width and init_std, found once at construction: the keys' std, and
        # wang_init's for init: reference. None outside a block.
        self.model_shape = _enclosing_shape()

    def init_weights(self, std: float, key_std: float | None = None) -> None:
        """neotron: values N(0, std^2) (the block passes the depth-scaled std for output
        projections), keys N(0, key_std^2), by default the model's init_std (or `std` outside
        a block). Theta is invariant to the keys' scale; their scale only sets the size of
        their gradients (~1 / |K|). reference: see the module docstring; `std` and `key_std`
        are then unused."""
        if self.cfg.init == "reference":
            shape = self.model_shape
            if shape is None:
                raise ValueError("pattention init=reference needs the model's n_layers and dim:"
                                 " build it inside a block, or set `model_shape`")
            nn.init.normal_(self.keys, mean=0.0, std=shape.init_std)
            nn.init.normal_(self.values, mean=0.0, std=shape.wang_std)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            return
        ks = key_std or (self.model_shape.init_std if self.model_shape is not None else std)
        nn.init.trunc_normal_(self.keys, mean=0.0, std=ks, a=-3 * ks, b=3 * ks)
        nn.init.trunc_normal_(self.values, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.linear(x, self.keys)  # [..., n]
        theta = pattention_norm(a, self.cfg.norm, self.norm_n).to(a.dtype)
        y = theta @ self.values.to(theta.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        # two matmuls (x K^T, Theta V), x3 for forward + backward; the norm and GeLU over the
        # n scores are elementwise: not counted (docs/accounting.md)
        return 6.0 * self.n_tokens * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tokens={self.n_tokens},"
                f" norm={self.cfg.norm}, norm_n={self.norm_n}")


class PattentionFFNConfig(LayerConfig):
    type: Literal["pattention"] = "pattention"
    n_tokens: int | None = Field(default=None, gt=0, description="None = 4 * model.dim")
    norm: Norm = "l2_norm_gelu"
    norm_n: int | None = Field(default=None, gt=0, description=NORM_N_DOC)
    init: Init = Field(default="neotron", description=INIT_DOC)

    def check(self, dim: int) -> list[tuple[str, str]]:
        return []


@FFNS.register(PattentionFFNConfig)
class PattentionFFN(nn.Module):
    """TokenFormer's FFN: one Pattention dim -> dim, no other activation."""

    def __init__(self, ctx: BuildContext, *, cfg: PattentionFFNConfig) -> None:
        super().__init__()
        self.ctx = ctx
        n = cfg.n_tokens or 4 * ctx.dim
        self.pattention = Pattention(ctx.dim, ctx.dim, cfg=cfg.model_copy(update={"n_tokens": n}))
        self.pattention.model_shape = ModelShape(ctx.n_layers, ctx.dim, ctx.init_std)

    def init_weights(self) -> None:
        self.pattention.init_weights(self.ctx.out_std, key_std=self.ctx.init_std)

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        return self.pattention(x)

    def flops_per_token(self, seq_len: int) -> float:
        return self.pattention.flops_per_token(seq_len)

"""Independent oracles for the sequence mixers: attention with RoPE, DeltaNet, Gated DeltaNet,
TTT-Linear and TTT-MLP, each against a reimplementation written in this file from its paper
(and the official code's math).

The references share no helper with neotron, on purpose (DESIGN.md, "Every layer has an
independent oracle"): their own projections, RMSNorm / L2 norm / LayerNorm, SiLU / GELU /
softplus, gate formulas, causal short convolution (an explicit loop over taps), RoPE (complex
rotation with torch.polar), softmax attention (explicit causal mask, no SDPA) and recurrences
(a plain Python loop over tokens; TTT's per-token inner gradients by autograd). neotron only
builds the layer; its parameters are copied into the reference by name, and the reference must
read every one of them (a new parameter the oracle does not know about fails the test).

Compared in fp64: the output, the input gradient and every parameter gradient, as a maximum
error relative to the reference's largest entry. Shapes: B=2, T=13 (not a multiple of any chunk
or mini-batch size used; one mini-batch size is larger than T). Each config option that changes
the math is on in at least one case. Document masking (SeqInfo.for_tokens with EOS tokens,
documents of length 1 and 2 included) is compared with the reference run on each document alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from neotron.arch import MIXERS
from neotron.arch.attention import AttentionConfig
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.deltanet import DeltaNetConfig, GatedDeltaNetConfig
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.ttt import TTTLinearConfig, TTTMLPConfig

F64 = torch.float64
DIM = 32
B, T = 2, 13
NORM_EPS = 1e-5  # the BuildContext's norm_eps below (RMSNorms of attention and DeltaNet)
L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + 1e-6)
TTT_LN_EPS = 1e-6  # official TTT: inner LayerNorm and post-norm epsilon
EOS = 0
# Packed rows with EOS ending documents: row 0 has documents of lengths 5, 2 and 6; row 1 of
# lengths 1 and 12 (shorter than the conv kernel; across chunk and mini-batch boundaries).
TOKENS = torch.tensor([
    [3, 1, 4, 1, EOS, 5, EOS, 9, 2, 6, 5, 3, 5],
    [EOS, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6],
])  # fmt: skip

# Maximum relative error allowed (error / largest entry of the reference, per tensor). The
# recurrent mixers are fp64 end to end: measured <= 2e-14. Two constants are computed in fp32
# even in an fp64 layer, and bound the error where they enter (measured max in brackets):
# - RoPE angles and their cos / sin (neotron.arch.rope.rope_angles, fp32 as in HF transformers);
#   attention's apply_rope also rounds q and k to fp32 to rotate them: attention [6e-7], TTT
#   with rope [2e-7];
# - TTT's 1/(i+1) token scaling (an int arange divided in the default dtype), inexact for
#   i + 1 = 3, 5, ...: every TTT config with mini_batch_size > 2 [2e-8].
# The configs free of both are checked at TOL_F64.
TOL_F64 = 1e-10
TOL_ROPE_ATTENTION = 5e-6
TOL_FP32_CONSTANTS = 1e-6


# ------------------------------------------------------------------------- harness


class Params(dict):
    """The layer's parameters by name, as fresh fp64 leaves; remembers what was read."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__(
            (n, t.detach().clone().requires_grad_()) for n, t in layer.named_parameters()
        )
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().__getitem__(name)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b if the layer has a bias): nn.Linear's convention for `name.weight`."""
        y = x @ self[f"{name}.weight"].T
        if f"{name}.bias" in self:
            y = y + self[f"{name}.bias"]
        return y


def build(cfg, seed: int = 0) -> torch.nn.Module:
    ctx = BuildContext(dim=DIM, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=NORM_EPS, init_std=0.2)  # fmt: skip
    layer = MIXERS.build(cfg, ctx)
    torch.manual_seed(seed)
    layer.init_weights()
    with torch.no_grad():  # off the init values: norms, gates, offsets and biases all matter
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer.to(F64)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def per_document(reference, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Run `reference` on every document (ended by EOS) of every row alone, then re-pack."""
    rows = []
    for b in range(x.shape[0]):
        ends = [t + 1 for t in (tokens[b] == EOS).nonzero().flatten().tolist()]
        cuts = sorted({0, *ends, x.shape[1]})
        rows.append(torch.cat([reference(x[b : b + 1, s:e]) for s, e in zip(cuts, cuts[1:])], 1))
    return torch.cat(rows, 0)


def compare(layer, reference, *, docs: bool = False, tol: float = TOL_F64, seed: int = 1) -> None:
    """Layer vs reference(params, x): outputs, x.grad and every parameter's gradient."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, T, DIM, generator=gen, dtype=F64)
    seq = SeqInfo.for_tokens(TOKENS, EOS) if docs else SeqInfo(positions=torch.arange(T))
    x = x0.clone().requires_grad_()
    y = layer(x, seq)

    p = Params(layer)
    x_ref = x0.clone().requires_grad_()
    if docs:
        y_ref = per_document(lambda xs: reference(p, xs), x_ref, TOKENS)
    else:
        y_ref = reference(p, x_ref)
    assert p.read == set(p), f"parameters the oracle does not model: {sorted(set(p) - p.read)}"

    w = torch.randn(y_ref.shape, generator=gen, dtype=F64)  # a generic loss sum(w * y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    errs = {"output": rel_err(y, y_ref), "x.grad": rel_err(x.grad, x_ref.grad)}
    for n, t in layer.named_parameters():
        assert p[n].grad is not None, f"{n}: the oracle's output does not depend on it"
        errs[f"{n}.grad"] = rel_err(t.grad, p[n].grad)
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative error above {tol:.0e}: {bad}"


# ---------------------------------------------------------- shared math (own versions)


def silu(x):
    return x / (1 + torch.exp(-x))


def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def softplus(x):
    return torch.log1p(torch.exp(x))


def gelu_tanh(x):
    # GELU, tanh approximation (Hendrycks & Gimpel 2016), the TTT code's choice.
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def l2_norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def causal_conv(x, w):
    """Depthwise causal conv, explicit loop over taps. x [B, T, C], w [C, K]; tap K-1 multiplies
    the current token, tap K-1-s the token s steps back (nn.Conv1d / causal-conv1d layout, as in
    fla's ShortConvolution); tokens before the start are zero."""
    K = w.shape[1]
    y = torch.zeros_like(x)
    for s in range(min(K, x.shape[1])):  # taps reaching before the start read zeros
        shifted = torch.cat([torch.zeros_like(x[:, :s]), x[:, : x.shape[1] - s]], dim=1)
        y = y + shifted * w[:, K - 1 - s]
    return y


def rope(x, positions, theta, pairs="half"):
    """RoPE (Su et al., arXiv 2104.09864, eq. 34) as a complex rotation: frequency i turns one
    pair of coordinates, seen as a complex number, by position * theta^(-2i/D). Pairs: "half"
    takes (x_i, x_{i + D/2}) (Llama / HF, neotron's default), "interleaved" takes
    (x_{2i}, x_{2i+1}) (RoFormer, the official TTT code). x [B, T, H, D], positions [T]."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D // 2, dtype=F64) * 2 / D)
    angles = positions.to(F64)[:, None] * freqs[None, :]
    turn = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    if pairs == "interleaved":
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous()) * turn
        return torch.view_as_real(z).flatten(-2)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * turn
    return torch.cat([z.real, z.imag], dim=-1)


# ------------------------------------------------------------------------- attention


def attention_reference(p: Params, x, cfg: AttentionConfig):
    """Causal softmax attention (Vaswani et al. 2017) with RoPE, GQA (Ainslie et al. 2023:
    query head h reads kv head h // (H / H_kv)) and optional per-head RMS qk-norm."""
    Bx, Tx, _ = x.shape
    H = cfg.n_heads
    Hkv = cfg.n_kv_heads or H
    D = cfg.head_dim or DIM // H
    q = p.linear("wq", x).reshape(Bx, Tx, H, D)
    k = p.linear("wk", x).reshape(Bx, Tx, Hkv, D)
    v = p.linear("wv", x).reshape(Bx, Tx, Hkv, D)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm.weight"], NORM_EPS)
        k = rms_norm(k, p["k_norm.weight"], NORM_EPS)
    pos = torch.arange(Tx)
    q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
    future = torch.arange(Tx)[None, :] > torch.arange(Tx)[:, None]
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(future, -math.inf)
        e = torch.exp(scores - scores.max(-1, keepdim=True).values)
        heads.append((e / e.sum(-1, keepdim=True)) @ v[:, :, g])
    return p.linear("wo", torch.cat(heads, dim=-1))


ATTENTION = {
    "mha": AttentionConfig(n_heads=4),
    "gqa_qknorm": AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True),
    "mqa_headdim_theta_bias": AttentionConfig(
        n_heads=2, n_kv_heads=1, head_dim=12, rope_theta=500.0, bias=True
    ),
}


@pytest.mark.parametrize("docs", [False, True], ids=["packed", "documents"])
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_matches_oracle(name, docs):
    cfg = ATTENTION[name]
    compare(build(cfg), lambda p, x: attention_reference(p, x, cfg), docs=docs,
            tol=TOL_ROPE_ATTENTION)  # fmt: skip


# ------------------------------------------------------------ DeltaNet / Gated DeltaNet


def deltanet_reference(p: Params, x, cfg: DeltaNetConfig, gated: bool):
    """DeltaNet (Yang et al., arXiv 2406.06484, sec. 3-4 and fla's DeltaNet layer) and Gated
    DeltaNet (Yang, Kautz, Hatamizadeh, arXiv 2412.06464, eq. 10; gate as in fla's
    naive_gdn_gate), one token at a time. Per head, state S [d_k, d_v]:

        S_t = a_t S_{t-1} + k_t (b_t (v_t - a_t S_{t-1}^T k_t))^T
            = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
        o_t = S_t^T q_t / sqrt(d_k)
        a_t = exp(-exp(A_log) * softplus(w_a x_t + dt_bias))     (a_t = 1: DeltaNet)
        b_t = sigmoid(w_b x_t)                                   (x2: allow_neg_eigval)
    """
    Bx, Tx, _ = x.shape
    H = cfg.n_heads
    dk = cfg.head_dim or DIM // H
    dv = round(dk * cfg.expand_v)
    q, k, v = p.linear("wq", x), p.linear("wk", x), p.linear("wv", x)
    if cfg.conv_size:
        q = causal_conv(q, p["q_conv.weight"])
        k = causal_conv(k, p["k_conv.weight"])
        v = causal_conv(v, p["v_conv.weight"])
    q = l2_norm(silu(q).reshape(Bx, Tx, H, dk))
    k = l2_norm(silu(k).reshape(Bx, Tx, H, dk))
    v = silu(v).reshape(Bx, Tx, H, dv)
    beta = sigmoid(p.linear("wb", x))
    if cfg.allow_neg_eigval:  # Grazzi et al., arXiv 2411.12537: beta in (0, 2)
        beta = 2 * beta
    if gated:
        g = -torch.exp(p["A_log"]) * softplus(p.linear("wa", x) + p["dt_bias"])
        alpha = torch.exp(g)
    S = torch.zeros(Bx, H, dk, dv, dtype=x.dtype)
    outs = []
    for t in range(Tx):
        if gated:
            S = alpha[:, t, :, None, None] * S
        kt, vt, qt, bt = k[:, t], v[:, t], q[:, t], beta[:, t, :, None]
        retrieved = (S * kt[..., :, None]).sum(-2)  # S^T k
        S = S + kt[..., :, None] * (bt * (vt - retrieved))[..., None, :]
        outs.append((S * qt[..., :, None]).sum(-2) / math.sqrt(dk))
    o = rms_norm(torch.stack(outs, dim=1), p["o_norm.weight"], NORM_EPS)  # per head
    if cfg.use_gate:
        o = o * silu(p.linear("wg", x).reshape(Bx, Tx, H, dv))
    return p.linear("wo", o.reshape(Bx, Tx, H * dv))


DELTANET = {
    "deltanet": DeltaNetConfig(n_heads=2, chunk_size=8),
    "deltanet_noconv_gate_neg_expandv": DeltaNetConfig(
        n_heads=2, chunk_size=5, conv_size=0, use_gate=True, allow_neg_eigval=True, expand_v=1.5
    ),
    "deltanet_conv3_reference_kernel": DeltaNetConfig(n_heads=4, conv_size=3, impl="reference"),
    "gated_deltanet": GatedDeltaNetConfig(n_heads=2, chunk_size=8),
    "gated_deltanet_nogate_neg_conv2": GatedDeltaNetConfig(
        n_heads=4, chunk_size=5, use_gate=False, allow_neg_eigval=True, conv_size=2
    ),
    "gated_deltanet_noconv_expandv2": GatedDeltaNetConfig(
        n_heads=2, head_dim=8, expand_v=2.0, conv_size=0, chunk_size=4
    ),
}


@pytest.mark.parametrize("docs", [False, True], ids=["packed", "documents"])
@pytest.mark.parametrize("name", list(DELTANET))
def test_deltanet_matches_oracle(name, docs):
    cfg = DELTANET[name]
    gated = cfg.type == "gated_deltanet"
    compare(build(cfg), lambda p, x: deltanet_reference(p, x, cfg, gated), docs=docs)


# ------------------------------------------------------------------------------- TTT


def ttt_reference(p: Params, x, cfg: TTTLinearConfig, mlp: bool):
    """TTT layer (Sun et al., arXiv 2407.04620, sec. 2-3, and the official ttt.py), primal
    form, one token at a time. Per head of width d, inner model f(z; W) = z + LN(g(z; W)), with
    g(z) = z W + b (TTT-Linear) or gelu_tanh(z W1 + b1) W2 + b2 (TTT-MLP). In every mini-batch
    of b tokens all gradients are taken at the mini-batch's first weights W_0:

        G_j  = grad_W 1/2 || LN(g(k_j; W_0)) - (v_j - k_j) ||^2          (autograd, per token)
        W_i  = W_0 - token_eta_i * sum_{j <= i} lr_j G_j,   z_i = f(q_i; W_i)
        token_eta_i = max(1/(i+1) + offset_i, 0),  lr_j = base_lr * sigmoid(w_lr x_j + b_lr) / d

    and the next mini-batch starts from the last token's weights. RoPE on q, k at the position
    inside the mini-batch (the official code: position_ids % mini_batch_size). Output:
    W_o [LN_post(z) * (gelu_tanh(W_g x) if use_gate)]."""
    Bx, Tx, _ = x.shape
    H = cfg.n_heads
    d = cfg.head_dim or DIM // H
    b = cfg.mini_batch_size
    q, k, v = p.linear("wq", x), p.linear("wk", x), p.linear("wv", x)
    if cfg.conv_size:  # no activation after TTT's conv
        q, k = causal_conv(q, p["q_conv.weight"]), causal_conv(k, p["k_conv.weight"])
    q, k, v = (t.reshape(Bx, Tx, H, d) for t in (q, k, v))
    if cfg.rope:
        pos = torch.arange(Tx) % b
        pairs = getattr(cfg, "rope_pairs", "half")
        q, k = rope(q, pos, cfg.rope_theta, pairs), rope(k, pos, cfg.rope_theta, pairs)
    lr = cfg.base_lr * sigmoid(p.linear("wlr", x)) / d  # [B, T, H]
    token_eta = (1 / torch.arange(1, b + 1, dtype=F64) + p["token_eta_offset"]).clamp_min(0)
    ln_w, ln_b = p["ttt_norm_weight"][:, None, :], p["ttt_norm_bias"][:, None, :]  # [H, 1, d]
    names = ("W1", "b1", "W2", "b2") if mlp else ("W0", "b0")

    def g(z, W):  # z [B, H, 1, d], W: per-(batch, head) weights [B, H, ...]
        if mlp:
            return gelu_tanh(z @ W[0] + W[1]) @ W[2] + W[3]
        return z @ W[0] + W[1]

    W = [p[n].expand(Bx, *p[n].shape) for n in names]
    outs = []
    for start in range(0, Tx, b):
        W_start, acc = W, [0.0] * len(W)
        for t in range(start, min(start + b, Tx)):
            kt, vt, qt = (u[:, t, :, None, :] for u in (k, v, q))  # [B, H, 1, d]
            pred = layer_norm(g(kt, W_start), ln_w, ln_b, TTT_LN_EPS)
            loss = 0.5 * ((pred - (vt - kt)) ** 2).sum()  # (batch, head) terms are independent
            grads = torch.autograd.grad(loss, W_start, create_graph=True)
            lr_t = lr[:, t, :, None, None]
            acc = [a + lr_t * G for a, G in zip(acc, grads)]
            W = [w - token_eta[t - start] * a for w, a in zip(W_start, acc)]
            outs.append(qt + layer_norm(g(qt, W), ln_w, ln_b, TTT_LN_EPS))
    z = torch.cat(outs, dim=2).transpose(1, 2).reshape(Bx, Tx, H * d)  # [B, H, T, d] -> [B, T, Hd]
    z = layer_norm(z, p["post_norm.weight"], p["post_norm.bias"], TTT_LN_EPS)
    if cfg.use_gate:
        z = z * gelu_tanh(p.linear("wg", x))
    return p.linear("wo", z)


TTT = {
    "ttt_linear": TTTLinearConfig(n_heads=2, mini_batch_size=4),
    "ttt_linear_conv_gate_norope": TTTLinearConfig(
        n_heads=2, mini_batch_size=5, conv_size=4, use_gate=True, rope=False
    ),
    "ttt_linear_minibatch_over_T_reference_kernel": TTTLinearConfig(
        n_heads=4, mini_batch_size=16, base_lr=0.5, impl="reference"
    ),
    "ttt_linear_exact_b2_norope": TTTLinearConfig(n_heads=2, mini_batch_size=2, rope=False),
    "ttt_mlp": TTTMLPConfig(n_heads=2, mini_batch_size=4),
    "ttt_mlp_conv_gate_ratio2": TTTMLPConfig(
        n_heads=2, mini_batch_size=3, conv_size=2, use_gate=True, mlp_ratio=2, rope_theta=100.0
    ),
    "ttt_mlp_exact_b2_norope_conv": TTTMLPConfig(
        n_heads=2, mini_batch_size=2, rope=False, conv_size=3, use_gate=True
    ),
}
if "rope_pairs" in TTTLinearConfig.model_fields:  # the official code's RoPE layout
    TTT["ttt_linear_interleaved_rope"] = TTTLinearConfig(
        n_heads=2, mini_batch_size=4, rope_pairs="interleaved"
    )
    TTT["ttt_mlp_interleaved_rope"] = TTTMLPConfig(
        n_heads=2, mini_batch_size=5, rope_pairs="interleaved", conv_size=4
    )


@pytest.mark.parametrize("docs", [False, True], ids=["packed", "documents"])
@pytest.mark.parametrize("name", list(TTT))
def test_ttt_matches_oracle(name, docs):
    cfg = TTT[name]
    mlp = cfg.type == "ttt_mlp"
    # Without RoPE and with 1/(i+1) in {1, 1/2} (exact in fp32), nothing is rounded to fp32.
    exact = not cfg.rope and cfg.mini_batch_size <= 2
    compare(build(cfg), lambda p, x: ttt_reference(p, x, cfg, mlp), docs=docs,
            tol=TOL_F64 if exact else TOL_FP32_CONSTANTS)  # fmt: skip

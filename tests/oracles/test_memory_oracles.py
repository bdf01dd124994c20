"""Independent oracles for the parameter-memory layers: MemoryFormer (linear, attention, FFN),
product-key memory and TokenFormer's Pattention, each against a reimplementation written in
this file from the papers and the official code, in fp64, outputs and gradients.

What is compared with what:
- the layer as built by neotron (dispatching to its own kernels), with every parameter set to
  random values (biases and norm weights included);
- a dense reference that reads the same parameters, copied by name, and shares no helper with
  neotron (no `neotron.kernels.*`, no neotron norm, hash, RoPE, top-k or embedding bag): its
  own sign-bit codes (Horner's rule) and one-hot table reads, its own LayerNorm / RMSNorm /
  GeLU / SiLU / sigmoid, its own complex-number RoPE, a brute-force top-k over all n^2
  product keys with the value read as a dense weight matrix times the table.
Outputs, the inputs' gradients and every parameter's gradient (tables, keys, values) agree to
~1e-15 (tolerance 1e-12); the MemoryFormer attention and FFN only to ~3e-7 (tolerance 1e-5),
because neotron runs their RoPE and their LayerNorm in fp32 even on fp64 inputs. The reference
must read every parameter of the layer (and find the biases the config asks for, no others),
so a parameter added later cannot go unchecked.

Sources of the reference math:
- MemoryFormer: Ding et al., NeurIPS 2024, arXiv 2411.12992, as coded in C0-Design/MemoryFormer
  (memory_module/compute_code_score/kernel.py `compute_code_score_torch`, MemoryLayer, the
  `extra_bit` MemoryBlock of megatron/model/transformer.py);
- product keys: Lample et al., NeurIPS 2019, arXiv 1907.05242, and Berges, Oguz et al., "Memory
  Layers at Scale", arXiv 2412.09764, as coded in facebookresearch/memory
  (lingua/product_key/memory.py `HashingMemory`);
- Pattention: Wang et al., ICLR 2025, arXiv 2410.23168, as coded in Haiyang-W/TokenFormer
  (megatron/model/tokenformer.py `Pattention.nonlinear_norm_func`).

Inputs avoid the decision boundaries: hash inputs stay >= 0.1 away from 0 except for entries
that are exactly 0 (which hash to bit 1, as the official `>= 0`), and the brute-force top-k
asserts a margin of 1e-9 between the k-th and the next score, so no fp64 tie decides a slot.
"""

from __future__ import annotations

import math

import pytest
import torch

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig, make_linear
from neotron.arch.memory import ProductKeyMemory, ProductKeyMemoryConfig
from neotron.arch.memoryformer import (
    MemoryFormerAttention,
    MemoryFormerAttentionConfig,
    MemoryFormerFFN,
    MemoryFormerFFNConfig,
    MemoryFormerLinearConfig,
)
from neotron.arch.tokenformer import PattentionConfig, PattentionFFN, PattentionFFNConfig

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}  # measured: <= 2e-15 of the largest entry
# For the two paths that neotron computes in fp32 even on fp64 inputs (RoPE, and the LayerNorm
# between MemoryFormer's two FFN memory layers): still ~1e4 below any of the mutations tried.
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
NORM_EPS = 1e-5


# ---------------------------------------------------------------- harness


class Weights(dict):
    """The layer's parameters by name, as fresh fp64 leaves; records the names the oracle
    reads, so that the test can require every parameter to be read."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__({n: p.detach().clone().requires_grad_()
                          for n, p in layer.named_parameters()})
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().__getitem__(name)


def ctx(dim: int) -> BuildContext:
    return BuildContext(dim=dim, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                        norm_eps=NORM_EPS, init_std=0.02)


@torch.no_grad()
def randomize_(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, so that zero-initialized biases and unit norm weights take part:
    N(0, 1/fan_in) for matrices and tables, N(0, 0.25) for vectors."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(layer.named_parameters()):
        std = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5
        p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * std)
    return layer


def compare(layer: torch.nn.Module, run_layer, oracle, x: torch.Tensor, tol=None, seed=1):
    """Forward and backward of the layer and of the oracle on the same input and weights."""
    tol = tol or TOL
    x1 = x.detach().clone().requires_grad_()
    y = run_layer(layer, x1)
    w = Weights(layer)
    x2 = x.detach().clone().requires_grad_()
    ref = oracle(w, x2)
    assert w.read == set(w), f"the oracle does not read {sorted(set(w) - w.read)}"
    torch.testing.assert_close(y, ref, **tol, msg=lambda m: f"output: {m}")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    names = [n for n, _ in layer.named_parameters()]
    got = torch.autograd.grad(y, [x1, *layer.parameters()], g, allow_unused=True)
    want = torch.autograd.grad(ref, [x2, *(w[n] for n in names)], g, allow_unused=True)
    for name, a, b in zip(["input", *names], got, want):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


# Our own elementwise functions (written out, not torch.nn.functional's).


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def silu(z: torch.Tensor) -> torch.Tensor:
    return z * sigmoid(z)


def gelu(z: torch.Tensor) -> torch.Tensor:
    """Exact GeLU, 0.5 z (1 + erf(z / sqrt 2)) (torch's F.gelu default, used by TokenFormer)."""
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def affine(x: torch.Tensor, w: Weights, prefix: str, bias: bool) -> torch.Tensor:
    """x W^T (+ b): a projection read by name; `bias`: whether the layer must have one."""
    return add_bias(x @ w[f"{prefix}.weight"].T, w, f"{prefix}.bias", bias)


def add_bias(y: torch.Tensor, w: Weights, name: str, bias: bool) -> torch.Tensor:
    assert (name in w) == bias, f"{name}: expected {'a' if bias else 'no'} bias"
    return y + w[name] if bias else y


def layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (h - mu) / torch.sqrt(var + eps) * weight + bias


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * weight


# ---------------------------------------------------------------- MemoryFormer


def sign_code(z: torch.Tensor) -> torch.Tensor:
    """z [..., tau] -> the chunk's code, MSB first: bit j is [z_j >= 0] (official `>= 0`),
    accumulated by Horner's rule, code = 2 code + bit."""
    code = torch.zeros(z.shape[:-1], dtype=torch.long)
    for j in range(z.shape[-1]):
        code = 2 * code + (z[..., j] >= 0).long()
    return code


def code_score(z: torch.Tensor, score: str) -> torch.Tensor:
    """The weight of the selected row, as the paper writes its probability,
    p = exp(sum_j |z_j|) / prod_j (e^{z_j} + e^{-z_j}); the official code multiplies it by
    ||z||_1 ('l1')."""
    p = torch.exp(z.abs().sum(-1)) / torch.prod(torch.exp(z) + torch.exp(-z), dim=-1)
    return p if score == "paper" else z.abs().sum(-1) * p


def memory_layer_ref(w: Weights, prefix: str, x: torch.Tensor, tau: int, score: str,
                     bias: bool = True):
    """One MemoryFormer memory layer: y = sum_k s_k onehot(code_k) @ T_k + b, dense (the
    official MemoryLayer always has the bias)."""
    tables = w[f"{prefix}tables"]  # [K, 2^tau, d_out]
    K, R, d_out = tables.shape
    assert R == 2**tau
    z = x.reshape(-1, K, tau)
    rows = torch.arange(R)
    onehot = (sign_code(z)[..., None] == rows).to(F64)  # [N, K, 2^tau]
    y = torch.einsum("nk,nkr,krd->nd", code_score(z, score), onehot, tables)
    y = add_bias(y, w, f"{prefix}bias", bias)
    return y.reshape(*x.shape[:-1], d_out)


def hash_input(shape, seed: int, zeros: int = 0) -> torch.Tensor:
    """Normal entries pushed >= 0.1 away from 0, and the first `zeros` entries exactly 0."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z.sign() * (z.abs() + 0.1)
    z.view(-1)[:zeros] = 0.0
    return z


# (in_dim, out_dim, tau, score, bias, impl): one table, several, a 1-bit hash, wide tables,
# both scores, with and without bias, the fused and the one-hot kernel paths.
LINEAR_CASES = {
    "tau4-l1": (12, 5, 4, "l1", True, "auto"),
    "tau4-paper": (12, 5, 4, "paper", True, "auto"),
    "tau3-no-bias-reference-impl": (9, 7, 3, "l1", False, "reference"),
    "tau1": (3, 4, 1, "l1", True, "fast"),
    "tau6-one-table": (6, 3, 6, "paper", False, "auto"),
    "tau5-two-tables": (10, 6, 5, "l1", True, "auto"),
}


@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_memoryformer_linear(case):
    in_dim, out_dim, tau, score, bias, impl = case
    cfg = MemoryFormerLinearConfig(tau=tau, score=score, bias=bias, impl=impl)
    layer = randomize_(make_linear(in_dim, out_dim, cfg).to(F64), seed=in_dim + tau)
    x = hash_input((2, 5, in_dim), seed=tau, zeros=3)

    def oracle(w, x):
        return memory_layer_ref(w, "", x, tau, score, bias=bias)

    compare(layer, lambda m, x: m(x), oracle, x)


@pytest.mark.parametrize("tau,extra_bits,score", [(4, 2, "l1"), (4, 0, "paper"), (3, 1, "l1")],
                         ids=["tau4+2", "tau4+0-paper", "tau3+1"])
def test_memoryformer_ffn(tau, extra_bits, score):
    """memory layer (dim -> K (tau + e)) -> LayerNorm -> memory layer of tau + e bits per
    chunk (the official MemoryBlock, `mlp_expand_type: extra_bit`)."""
    dim = 12
    cfg = MemoryFormerFFNConfig(tau=tau, extra_bits=extra_bits, score=score)
    layer = randomize_(MemoryFormerFFN(ctx(dim), cfg=cfg).to(F64), seed=7)
    x = hash_input((2, 4, dim), seed=8, zeros=2)
    seq = SeqInfo(positions=torch.arange(4))

    def oracle(w, x):
        K = dim // tau
        h = memory_layer_ref(w, "up.", x, tau, score)
        assert h.shape[-1] == K * (tau + extra_bits)
        h = layer_norm(h, w["norm.weight"], w["norm.bias"], NORM_EPS)
        assert h.abs().min() > 1e-4  # no sign decided by (fp32) rounding
        return memory_layer_ref(w, "down.", h, tau + extra_bits, score)

    # the layer's LayerNorm runs in fp32 whatever the input dtype
    compare(layer, lambda m, x: m(x, seq), oracle, x, tol=FP32_TOL)


def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (Su et al., arXiv 2104.09864) as a complex rotation, in neotron's rotate-half
    pairing: entry i and entry i + D/2 form the complex number rotated by pos * theta^(-2i/D).
    x [B, T, H, D], positions [T] or [B, T]."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=F64) / D)  # [D/2]
    pos = positions.to(F64).expand(x.shape[0], x.shape[1])
    rot = torch.polar(torch.ones_like(pos[..., None] * freqs), pos[..., None] * freqs)
    zc = torch.complex(x[..., : D // 2], x[..., D // 2:]) * rot[:, :, None, :]
    return torch.cat([zc.real, zc.imag], dim=-1)


ATTN_CASES = {
    "plain": ({}, False),
    "qk-norm-paper-score": ({"qk_norm": True, "score": "paper"}, False),
    "documents": ({"tau": 3, "n_heads": 3}, True),
}


@pytest.mark.parametrize("case", ATTN_CASES.values(), ids=ATTN_CASES.keys())
def test_memoryformer_attention(case):
    """q, k, v memory layers, RoPE, causal softmax attention scaled by 1/sqrt(head_dim), and no
    output projection (the official `del_dense`). Tolerance ~1e-6: neotron computes RoPE in
    fp32 whatever the input dtype."""
    kw, documents = case
    kw = {"n_heads": 2, "tau": 4, **kw}
    dim, B, T = 12, 2, 6
    cfg = MemoryFormerAttentionConfig(**kw)
    layer = randomize_(MemoryFormerAttention(ctx(dim), cfg=cfg).to(F64), seed=3)
    tokens = torch.tensor([[1, 2, 0, 3, 4, 5], [0, 1, 2, 3, 0, 4]])
    seq = SeqInfo.for_tokens(tokens, eos_id=0 if documents else None)
    x = hash_input((B, T, dim), seed=4, zeros=2)
    H, hd = cfg.n_heads, dim // cfg.n_heads

    def oracle(w, x):
        q, k, v = (memory_layer_ref(w, f"{p}.", x, cfg.tau, cfg.score).view(B, T, H, hd)
                   for p in ("wq", "wk", "wv"))
        if cfg.qk_norm:
            q = rms_norm(q, w["q_norm.weight"], NORM_EPS)
            k = rms_norm(k, w["k_norm.weight"], NORM_EPS)
        q = rope_complex(q, seq.positions, cfg.rope_theta)
        k = rope_complex(k, seq.positions, cfg.rope_theta)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
        if seq.doc_ids is not None:
            allowed = allowed & (seq.doc_ids[:, :, None] == seq.doc_ids[:, None, :])
        s = s.masked_fill(~allowed[:, None], -math.inf)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        return torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hd)

    compare(layer, lambda m, x: m(x, seq), oracle, x, tol=FP32_TOL)


# ---------------------------------------------------------------- product-key memory


def product_key_memory_ref(w: Weights, x: torch.Tensor, cfg: ProductKeyMemoryConfig):
    """HashingMemory.forward, densely: the n^2 product keys [K1_i ; K2_j] (slot i * n + j)
    scored one by one, the top knn by a full sort, softmax over those knn (zero elsewhere),
    the memory read as (weights [N, n^2]) @ V summed over heads, then Memory+ and the gate."""
    H, n, knn, kd = cfg.heads, cfg.n_keys, cfg.knn, cfg.k_dim
    half = kd // 2
    xf = x.reshape(-1, x.shape[-1])
    N = xf.shape[0]
    q = affine(xf, w, "query", bias=cfg.query_bias).view(N, H, kd)
    keys = w["keys"].reshape(H, 2, n, half)  # the official (2 H n, half) parameter, viewed
    full = torch.cat([keys[:, 0, :, None, :].expand(H, n, n, half),
                      keys[:, 1, None, :, :].expand(H, n, n, half)], dim=-1)
    full = full.reshape(H, n * n, kd)  # row i * n + j = [K1_i ; K2_j]
    scores = torch.einsum("nhd,hsd->nhs", q, full)  # [N, H, n^2]

    order = scores.detach().argsort(dim=-1, descending=True)
    ranked = scores.detach().gather(-1, order)
    if knn < n * n:
        assert (ranked[..., knn - 1] - ranked[..., knn]).min() > 1e-9, "near-tie at the k-th"
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[..., :knn], True)
    e = torch.where(chosen, torch.exp(scores - ranked[..., :1]), torch.zeros_like(scores))
    p = e / e.sum(-1, keepdim=True)  # softmax over each head's knn slots
    m = torch.einsum("nhs,sv->nv", p, w["values"])  # heads summed

    if cfg.swilu:  # Memory+: W_o (m * SiLU(W_s x)); biases by config (Meta's Linears have them)
        out = affine(m * silu(affine(xf, w, "ws", cfg.bias)), w, "wo", cfg.bias)
    else:
        out = m
    if cfg.gated:
        out = out * sigmoid(affine(xf, w, "gate", cfg.bias))
    if cfg.parallel_ffn is not None:  # UltraMemV2 placement: a SwiGLU beside the memory
        h = silu(affine(xf, w, "ffn.w1", False)) * affine(xf, w, "ffn.w3", False)
        out = out + affine(h, w, "ffn.w2", False)
    return out.view(*x.shape[:-1], -1)


PKM_CASES = {
    "memory+": {},
    "plain-pkm": {"swilu": False},
    "gated": {"gated": True},
    "no-query-bias": {"query_bias": False},
    "v_dim-narrow": {"v_dim": 6},
    "knn1": {"knn": 1},
    "knn-equals-n": {"knn": 5},
    "one-head-wide-keys": {"heads": 1, "k_dim": 12},
    "parallel-ffn": {"parallel_ffn": {"type": "swiglu", "hidden_dim": 8}},
    "biases-gated": {"bias": True, "gated": True},
    "biases-plain-gated": {"bias": True, "swilu": False, "gated": True},
    "reference-bag": {"impl": "reference", "gated": True},
    "fast-bag": {"impl": "fast", "swilu": False, "gated": True},
}


@pytest.mark.parametrize("kw", PKM_CASES.values(), ids=PKM_CASES.keys())
def test_product_key_memory(kw):
    dim = 10
    cfg = ProductKeyMemoryConfig(**{"n_keys": 5, "heads": 2, "knn": 3, "k_dim": 8, **kw})
    layer = randomize_(ProductKeyMemory(ctx(dim), cfg=cfg).to(F64), seed=11)
    x = torch.randn(2, 6, dim, generator=torch.Generator().manual_seed(12), dtype=F64)
    seq = SeqInfo(positions=torch.arange(6))
    compare(layer, lambda m, x: m(x, seq), lambda w, x: product_key_memory_ref(w, x, cfg), x)


def test_product_key_memory_reads_the_slots_of_the_brute_force_top_k():
    """The slots themselves (the layer's lookup) against the full sort over n^2 keys, with
    halves of the same size so that a swapped i * n + j shows as a wrong slot."""
    cfg = ProductKeyMemoryConfig(n_keys=6, heads=2, knn=4, k_dim=8)
    layer = randomize_(ProductKeyMemory(ctx(10), cfg=cfg).to(F64), seed=5)
    x = torch.randn(9, 10, generator=torch.Generator().manual_seed(6), dtype=F64)
    w = Weights(layer)
    q = affine(x, w, "query", True).view(9, 2, 8)
    k1, k2 = w["keys"][:, 0], w["keys"][:, 1]
    s = (torch.einsum("nhd,hid->nhi", q[..., :4], k1)[..., :, None]
         + torch.einsum("nhd,hjd->nhj", q[..., 4:], k2)[..., None, :]).flatten(-2)
    want = s.argsort(dim=-1, descending=True)[..., :4]
    slots, weights = layer.lookup(x)
    assert torch.equal(slots, want)  # sorted by score, as the official topk(sorted=True)
    ref = torch.exp(s.gather(-1, want) - s.gather(-1, want[..., :1]))
    torch.testing.assert_close(weights, ref / ref.sum(-1, keepdim=True), **TOL)


# ---------------------------------------------------------------- TokenFormer Pattention


def theta_ref(a: torch.Tensor, kind: str, n_s: int) -> torch.Tensor:
    """Pattention.nonlinear_norm_func, written out: tau = sqrt(n_s) for the L2 forms, n_s for
    the softmax form (n_s = the number of parameter tokens in the official code)."""
    if kind == "l2_norm_gelu":
        return gelu(a / torch.sqrt((a * a).sum(-1, keepdim=True)) * math.sqrt(n_s))
    if kind == "gelu_l2_norm":
        g = gelu(a)
        return g / torch.sqrt((g * g).sum(-1, keepdim=True)) * math.sqrt(n_s)
    e = torch.exp(a)
    return e / e.abs().sum(-1, keepdim=True) * n_s  # "softmax = exp_l1_norm"


def pattention_ref(w: Weights, x: torch.Tensor, kind: str, n_s: int | None, prefix: str = "",
                   bias: bool = False):
    """Theta(X K_P^T) V_P; TokenFormer has no bias (neotron adds one only when asked)."""
    keys, values = w[f"{prefix}keys"], w[f"{prefix}values"]
    a = x @ keys.T  # no 1/sqrt(d): the official scale is 1
    y = theta_ref(a, kind, n_s or keys.shape[0]) @ values
    return add_bias(y, w, f"{prefix}bias", bias)


NORMS = ["l2_norm_gelu", "gelu_l2_norm", "softmax"]
# (in, out, n_tokens, norm_n, bias): tokens = in (default), more tokens than in, fewer, a
# frozen norm_n (after growth), and the biased projection a block may ask for.
PATTENTION_CASES = {
    "tokens-default": (6, 5, None, None, False),
    "more-tokens": (6, 5, 11, None, False),
    "fewer-tokens-bias": (6, 5, 3, None, True),
    "frozen-norm-n": (6, 4, 9, 7, False),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", PATTENTION_CASES.values(), ids=PATTENTION_CASES.keys())
def test_pattention_linear(case, norm):
    in_dim, out_dim, n_tokens, norm_n, bias = case
    cfg = PattentionConfig(n_tokens=n_tokens, norm=norm, norm_n=norm_n)
    layer = randomize_(make_linear(in_dim, out_dim, cfg, bias=bias).to(F64), seed=21)
    x = torch.randn(2, 5, in_dim, generator=torch.Generator().manual_seed(22), dtype=F64)
    compare(layer, lambda m, x: m(x), lambda w, x: pattention_ref(w, x, norm, norm_n, bias=bias),
            x)


@pytest.mark.parametrize("norm", NORMS)
def test_pattention_ffn(norm):
    """TokenFormer's FFN: one Pattention dim -> dim with 4 dim tokens, no other activation."""
    dim = 6
    layer = randomize_(PattentionFFN(ctx(dim), cfg=PattentionFFNConfig(norm=norm)).to(F64), 23)
    x = torch.randn(2, 4, dim, generator=torch.Generator().manual_seed(24), dtype=F64)
    seq = SeqInfo(positions=torch.arange(4))

    def oracle(w, x):
        assert w["pattention.keys"].shape == (4 * dim, dim)
        return pattention_ref(w, x, norm, None, prefix="pattention.")

    compare(layer, lambda m, x: m(x, seq), oracle, x)

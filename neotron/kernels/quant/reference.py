"""Quantizers for quantization-aware training, in plain PyTorch: the readable oracle.

Everything here is *fake* quantization: values are rounded onto a low-precision grid and
dequantized back into the input's floating-point dtype, so the matmuls run in bf16/fp32 on any
device. Hopper (H100/H200) has no FP4 tensor cores; only accuracy can be studied this way.

1.58-bit (BitNet b1.58, arXiv 2402.17764; the quantizers of the training FAQ as torchao's
`test_bitnet_training` transcribes them), written from the equations:

    weights, per tensor:   s_w = max(mean|W|, 1e-5);  W_q = clamp(round(W / s_w), -1, 1) * s_w
    activations, per token (last dim):
                           s_x = 127 / max(max|x|, 1e-5);  x_q = clamp(round(x s_x), -128, 127) / s_x
    straight-through:      forward uses W_q, x_q; backward passes the gradient to W, x unchanged

The weight's mean is a full reduction: on a DTensor (tensor-parallel shard) `abs().mean()`
reduces over every shard, so the scale is the whole weight's, not the local shard's.

FP4 (Quartet, Castro, Panferov et al., arXiv 2505.14669; E2M1 elements of the OCP MX spec):

    grid   E2M1 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign
    MXFP4  groups of 32 along the last dim, one power-of-two (E8M0) scale per group
           forward ("quest" scale):  s = 2^floor(log2(0.4871 * std(group)))   (0.4871 = 2.9225 / 6,
           the MSE-optimal Gaussian clip over 6); round to nearest; |x/s| >= 6 is clipped and its
           gradient masked (the "trust mask" 1[|x/s| < 6])
           backward ("absmax" scale):  s = 2^ceil(log2(max|group| / 6)), so the group max lands
           in (3, 6] and nothing clips; stochastic rounding between the two neighbouring grid
           points, which is unbiased: E[SR(v)] = v
    NVFP4  groups of 16, an FP8 E4M3 scale per group times one fp32 scale per tensor:
           s_t = max|x| / (6 * 448);  s_g = e4m3(max|group| / (6 s_t));  scale = s_g * s_t
    Hadamard  rotations along the last dim in blocks of n (n = 32): x -> x H_n / sqrt(n) (Sylvester
           construction, symmetric and orthonormal: its own inverse). The backward GEMMs use a
           randomized one, diag(random signs) H_n / sqrt(n), drawn afresh for every backward.

`fp4_linear` is the Quartet linear layer as an autograd function: forward y = Q(x H) Q(W H)^T
(H along the inner dimension on both sides, so the rotation cancels in the product), backward
dX and dW as GEMMs of stochastically rounded FP4 operands rotated along their inner dimension,
then the trust masks and H^T. Random numbers (signs, rounding) come from torch's generator, so a
seeded run (and a resumed one, which restores the RNG state) is reproducible.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Tensor = torch.Tensor

# ------------------------------------------------------------------ 1.58-bit (BitNet)

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def absmean_scale(w: Tensor) -> Tensor:
    """Per-tensor scale of ternary weights: max(mean|W|, 1e-5), reduced over the whole tensor
    (all shards of a DTensor), as a 0-dim tensor in w's dtype."""
    return w.abs().mean().clamp_min(WEIGHT_EPS)


def ternary_codes(w: Tensor, scale: Tensor) -> Tensor:
    """{-1, 0, +1} codes of w for a given per-tensor scale (floating point, w's dtype)."""
    return (w / scale).round().clamp(-1, 1)


def quantize_weight_ternary(w: Tensor) -> Tensor:
    """Absmean ternary fake-quantization: clamp(round(W / s), -1, 1) * s, s = mean|W|."""
    scale = absmean_scale(w)
    return ternary_codes(w, scale) * scale


def quantize_activation_int8(x: Tensor) -> Tensor:
    """Per-token absmax 8-bit fake-quantization over the last dim, computed in fp32 (fp64
    kept) and returned in x's dtype."""
    xf = x if x.dtype == torch.float64 else x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS)
    return ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)


def ste(x: Tensor, xq: Tensor) -> Tensor:
    """Straight-through estimator: the value of xq, the gradient of x (identity).

    Written as xq + (x - x), detached where needed, rather than x + (xq - x).detach(): the
    forward value is then exactly xq (x - x is exactly 0), which the ternary export relies on
    to reproduce the logits bit for bit."""
    return xq.detach() + (x - x.detach())


def blend(x: Tensor, xq: Tensor, lam: Tensor | float) -> Tensor:
    """The gradual-quantization target x + lam (xq - x), exactly x at lam = 0 and exactly xq
    at lam >= 1, with a straight-through gradient (identity to x) for every lam."""
    xd, qd = x.detach(), xq.detach()
    lam = torch.as_tensor(lam, dtype=xd.dtype, device=xd.device)
    target = torch.where(lam >= 1, qd, xd + lam * (qd - xd))
    return ste(x, target)


# ------------------------------------------------------------------ FP4 (E2M1)

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
QUEST_GAUSSIAN_SCALE = 2.92247856 / 6.0  # Quartet's `gaussian_scale` of the forward quantizer
Format = Literal["mxfp4", "nvfp4"]
GROUP_SIZE = {"mxfp4": 32, "nvfp4": 16}


def _e2m1_step_inverse(a: Tensor) -> Tensor:
    """1 / (spacing of the E2M1 grid) at magnitude a: 2 on [0, 2), 1 on [2, 4), 1/2 on [4, 6]."""
    return torch.where(a < 2, 2.0, torch.where(a < 4, 1.0, 0.5)).to(a.dtype)


def round_to_e2m1(v: Tensor) -> Tensor:
    """Round to the nearest E2M1 value (magnitudes above 6 saturate at 6); a tie goes to the
    smaller magnitude. The grid is uniform on [0, 2), [2, 4) and [4, 6] (spacings 1/2, 1, 2),
    so rounding is ceil(a k - 1/2) / k with k the inverse spacing where a lies."""
    a = v.abs().clamp(max=E2M1_MAX)
    k = _e2m1_step_inverse(a)
    return torch.sign(v) * (torch.ceil(a * k - 0.5) / k)


def stochastic_round_to_e2m1(v: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round |v| up to the next E2M1 value with probability (|v| - lo) / (hi - lo), else down
    to lo, the largest E2M1 value <= |v|: unbiased for |v| <= 6 (beyond, saturates at 6).
    With k the inverse grid spacing at |v|: floor(|v| k + u) / k, u ~ U[0, 1)."""
    a = v.abs().clamp(max=E2M1_MAX)
    k = _e2m1_step_inverse(a)
    u = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
    return torch.sign(v) * (torch.floor(a * k + u) / k).clamp(max=E2M1_MAX)


def round_scale_e8m0_floor(s: Tensor) -> Tensor:
    """2^floor(log2 s): a power-of-two (E8M0) scale at or below s (s > 0)."""
    return torch.exp2(torch.floor(torch.log2(s)))


def round_scale_e4m3(s: Tensor) -> Tensor:
    """s rounded to FP8 E4M3 (saturating at 448), back in s's dtype."""
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(s.dtype)


def group_scales(g: Tensor, fmt: Format, mode: Literal["quest", "absmax"]) -> Tensor:
    """Scales [..., n_groups, 1] for grouped values g [..., n_groups, group]."""
    amax = g.abs().amax(dim=-1, keepdim=True)
    if fmt == "nvfp4":
        # two-level scale: fp32 per tensor, E4M3 per group (absmax: the group max maps to ~6)
        s_t = (g.abs().amax() / (E2M1_MAX * E4M3_MAX)).clamp_min(1e-30)
        s_g = round_scale_e4m3(amax / (E2M1_MAX * s_t))
        s_g = torch.where(s_g > 0, s_g, torch.ones_like(s_g))
        return s_g * s_t
    if mode == "quest":
        std = g.std(dim=-1, keepdim=True, unbiased=False)
        base = QUEST_GAUSSIAN_SCALE * std
        # A constant group has std 0; fall back to its absmax (Quartet's kernel would
        # collapse it to ~0 with a 2^-27 scale).
        base = torch.where(base > 0, base, amax / E2M1_MAX)
        base = torch.where(base > 0, base, torch.ones_like(base))
        return round_scale_e8m0_floor(base)
    # absmax, power of two, no clipping: max|g| / s in (3, 6]
    base = torch.where(amax > 0, amax / E2M1_MAX, torch.ones_like(amax))
    return torch.exp2(torch.ceil(torch.log2(base)))


def fp4_quantize(
    x: Tensor,
    fmt: Format = "mxfp4",
    *,
    mode: Literal["quest", "absmax"] = "quest",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Fake-quantize x [..., K] to FP4 in groups along the last dim (K a multiple of the group
    size: 32 for mxfp4, 16 for nvfp4). Returns (dequantized values in x's dtype, clip mask
    1[|x / s| < 6] as bool). Computed in fp32 (fp64 kept)."""
    group = GROUP_SIZE[fmt]
    K = x.shape[-1]
    if K % group:
        raise ValueError(f"fp4_quantize: last dim {K} is not a multiple of the {fmt} group {group}")
    xf = x if x.dtype == torch.float64 else x.float()
    g = xf.unflatten(-1, (K // group, group))
    s = group_scales(g, fmt, mode)
    v = g / s
    q = stochastic_round_to_e2m1(v, generator) if stochastic else round_to_e2m1(v)
    mask = v.abs() < E2M1_MAX
    return (q * s).flatten(-2).to(x.dtype), mask.flatten(-2)


# ------------------------------------------------------------------ Hadamard


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix H_n / sqrt(n) (n a power of two), built
    explicitly: H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]]. Cached: do not modify in place."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _hadamard(n, torch.device(device) if device is not None else torch.device("cpu"), dtype)


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def random_hadamard(n: int, device=None, dtype=torch.float32,
                    generator: torch.Generator | None = None) -> Tensor:
    """diag(random signs) H_n / sqrt(n): orthogonal, re-drawn for every backward."""
    signs = torch.randint(0, 2, (n,), generator=generator, device=device).to(dtype) * 2 - 1
    return signs[:, None] * hadamard_matrix(n, device, dtype)


def rotate(x: Tensor, h: Tensor) -> Tensor:
    """Multiply the last dim of x by h in blocks of h's size: x [..., K] -> x_blocks @ h."""
    n = h.shape[0]
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"rotate: last dim {K} is not a multiple of the Hadamard size {n}")
    return (x.unflatten(-1, (K // n, n)) @ h.to(x.dtype)).flatten(-2)


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


# ------------------------------------------------------------------ the Quartet linear


def _sr_gemm(a: Tensor, b: Tensor, fmt: Format, n: int, generator) -> Tensor:
    """a [P, R] @ b[R, Q] with both operands rotated along the inner dim R by one random
    Hadamard and stochastically rounded to FP4 (R zero-padded to a whole block)."""
    block = max(n, GROUP_SIZE[fmt])
    at = _pad_last(a, block)
    bt = _pad_last(b.t(), block)
    if n:
        h = random_hadamard(n, a.device, a.dtype, generator)
        at, bt = rotate(at, h), rotate(bt, h)
    aq, _ = fp4_quantize(at, fmt, mode="absmax", stochastic=True, generator=generator)
    bq, _ = fp4_quantize(bt, fmt, mode="absmax", stochastic=True, generator=generator)
    return aq @ bq.t()


class _QuartetLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, fmt, hadamard, backward, generator):
        h = hadamard_matrix(hadamard, x.device, x.dtype) if hadamard else None
        xr = rotate(x, h) if h is not None else x
        wr = rotate(w, h) if h is not None else w
        fwd_mode = "absmax" if fmt == "nvfp4" else "quest"
        xq, mx = fp4_quantize(xr, fmt, mode=fwd_mode)
        wq, mw = fp4_quantize(wr, fmt, mode=fwd_mode)
        ctx.save_for_backward(xq, wq, mx, mw)
        ctx.cfg = (fmt, hadamard, backward, generator)
        return xq @ wq.t()

    @staticmethod
    def backward(ctx, e):
        xq, wq, mx, mw = ctx.saved_tensors
        fmt, hadamard, backward, generator = ctx.cfg
        e = e.to(xq.dtype)
        if backward == "quartet":
            dxq = _sr_gemm(e, wq, fmt, hadamard, generator)[:, : xq.shape[1]]
            dwq = _sr_gemm(e.t(), xq, fmt, hadamard, generator)[:, : wq.shape[1]]
        else:  # "ste": full-precision backward GEMMs on the quantized operands
            dxq, dwq = e @ wq, e.t() @ xq
        dx, dw = dxq * mx, dwq * mw  # trust masks: no gradient where the forward clipped
        if hadamard:
            h = hadamard_matrix(hadamard, xq.device, xq.dtype)
            dx, dw = rotate(dx, h.t()), rotate(dw, h.t())
        return dx, dw, None, None, None, None


def fp4_linear(
    x: Tensor,
    w: Tensor,
    *,
    fmt: Format = "mxfp4",
    hadamard: int = 32,
    backward: Literal["quartet", "ste"] = "quartet",
    generator: torch.Generator | None = None,
) -> Tensor:
    """y = x W^T with Quartet's FP4 fake-quantization in both directions. x [..., K], w [N, K];
    K a multiple of the group size and of `hadamard` (0 = no rotation). Computes in x's dtype
    (fp32 on CPU, bf16 under autocast on GPU; the quantizers themselves work in fp32)."""
    lead = x.shape[:-1]
    y = _QuartetLinear.apply(x.reshape(-1, x.shape[-1]), w.to(x.dtype), fmt, hadamard, backward,
                             generator)
    return y.reshape(*lead, w.shape[0])

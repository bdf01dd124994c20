"""Quantization-aware training: BitLinear (1.58-bit) and the FP4 (Quartet MXFP4 / NVFP4)
quantizers and linear layer.

What is compared with what:
- BitLinear's forward and gradients, in fp64, against a re-derivation from the BitNet
  b1.58 formulas written here (own RMSNorm, own quantizers in torchao's `1 / mean` form, own
  straight-through rule: gradients of `F.linear(x_q, W_q)` taken with respect to x_q and W_q
  and passed on unchanged). Shapes: odd widths, one token, a bias, with and without the norm.
- The gradual schedule: at lam = 0 a whole model reproduces the dense model bit for bit
  (logits and gradients), at 0 < lam < 1 it is W + lam (W_q - W), and the layer-wise ramp.
- FP4: every output lies on the E2M1 grid times a power-of-two (MXFP4) or E4M3 x fp32
  (NVFP4) scale per group; round to nearest agrees with a brute-force nearest search; the
  scale follows Quartet's formula; the clip mask; the Hadamard matrix against its closed form
  (-1)^popcount(i & j) / sqrt(n), orthogonality and inversion; stochastic rounding is
  unbiased (Monte-Carlo); the FP4 linear's forward and its `ste` backward against an oracle
  written here, and its Quartet backward is unbiased around that `ste` gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neotron.arch.quant import (
    BitLinear,
    BitLinearConfig,
    FP4Linear,
    FP4LinearConfig,
    ramp_lambda,
    set_quant_step,
)
from neotron.kernels.quant import reference as Q

D = torch.float64
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=D)


# ------------------------------------------------------------------ BitLinear oracle


def _rmsnorm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def _ternary(w):
    inv = 1.0 / w.abs().mean().clamp(min=1e-5)  # torchao's s_w = 1 / mean|W|
    return (w * inv).round().clamp(-1, 1) / inv


def _int8(x):
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def _oracle(x, w, g, b, *, norm, eps=1e-5):
    """Forward and straight-through gradients of a BitLinear, for a loss sum(y * r)."""
    x = x.detach().requires_grad_(True)
    xn = _rmsnorm(x, g, eps) if norm else x
    xq = _int8(xn.detach()).requires_grad_(True)
    wq = _ternary(w.detach()).requires_grad_(True)
    bb = None if b is None else b.detach().requires_grad_(True)
    y = F.linear(xq, wq, bb)
    r = torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(7))
    (y * r).sum().backward()
    gx = torch.autograd.grad(xn, x, grad_outputs=xq.grad)[0] if norm else xq.grad
    return y.detach(), gx, wq.grad, None if b is None else bb.grad, r


@pytest.mark.parametrize("norm", [True, False], ids=["input_norm", "bare"])
@pytest.mark.parametrize("shape", [(2, 5, 24, 13), (1, 1, 7, 3)], ids=["odd_widths", "one_token"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_bitlinear_forward_and_ste_gradients_match_the_formula(norm, shape, bias):
    B, T, fin, fout = shape
    torch.manual_seed(0)
    layer = BitLinear(fin, fout, bias=bias, input_norm=norm).to(D)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        if bias:
            layer.bias.normal_()
        if norm:
            layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, T, fin, dtype=D) * 3
    g = layer.norm.weight if norm else None
    y_ref, gx_ref, gw_ref, gb_ref, r = _oracle(x, layer.weight, g, layer.bias, norm=norm)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (y * r).sum().backward()
    torch.testing.assert_close(xx.grad, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, gw_ref, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, gb_ref)
    # the quantized weight really is ternary times one scale
    wq = layer.quantized_weight().detach()
    scale = layer.weight.abs().mean()
    assert set((wq / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(wq, (wq / scale).round() * scale)


def test_bitlinear_activation_quantization_is_per_token_int8():
    layer = BitLinear(16, 8, input_norm=False).to(D)
    x = torch.randn(3, 4, 16, dtype=D)
    x[0, 0] *= 1000  # one loud token must not change the others' scale
    xq = Q.quantize_activation_int8(x)
    s = 127.0 / x.abs().amax(-1, keepdim=True)
    codes = xq * s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert codes.abs().max() <= 127 + 1e-9
    torch.testing.assert_close(xq[1:], _int8(x[1:]))
    assert layer.cfg.quantize_activations


def test_bitlinear_config_input_norm_argument_wins():
    assert BitLinear(8, 4, input_norm=False, cfg=BitLinearConfig()).norm is None
    assert BitLinear(8, 4, cfg=BitLinearConfig(input_norm=False)).norm is None
    assert BitLinear(8, 4).norm is not None


# ------------------------------------------------------------------ gradual schedule


def _tiny(linear: str, *extra: str):
    from neotron.config import load
    from tests.conftest import ROOT

    over = ["run_dir=/tmp/neotron-unused", "model.vocab_size=512", "data.tokenizer.vocab_size=512",
            "model.dim=64", "model.n_layers=3", "model.blocks.attention.mixer.n_heads=2",
            "model.blocks.attention.mixer.n_kv_heads=1", f"model.linear.type={linear}", *extra]
    return load(ROOT / "configs" / "demo" / "llama.yaml", over)


def _pair(*extra: str):
    """A dense model and a BitNet model with the same weights, in fp64."""
    from neotron.arch import build_model, materialize

    dense = materialize(build_model(_tiny("dense").model), "cpu", 0).to(D)
    quant = materialize(build_model(_tiny("bitnet", *extra).model), "cpu", 0).to(D)
    missing, unexpected = quant.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("norm.weight") for k in missing)
    return dense, quant


def test_lambda_zero_reproduces_the_full_precision_model_exactly():
    dense, quant = _pair("model.linear.input_norm=false", "model.linear.ramp_steps=10")
    set_quant_step(quant, 0)
    x = torch.randint(0, 512, (2, 17))
    ld, lq = dense(x), quant(x)
    assert torch.equal(ld, lq)
    ld.square().mean().backward()
    lq.square().mean().backward()
    for (n, pd), (_, pq) in zip(dense.named_parameters(), quant.named_parameters()):
        assert torch.equal(pd.grad, pq.grad), n
    # past the ramp the model is the fully quantized one, which differs
    set_quant_step(quant, 10)
    assert not torch.allclose(quant(x), ld)


def test_intermediate_lambda_blends_weights_and_activations():
    layer = BitLinear(32, 8, input_norm=False, cfg=BitLinearConfig(ramp_steps=4)).to(D)
    x = torch.randn(5, 32, dtype=D)
    set_quant_step(torch.nn.Sequential(layer), 1)  # lam = 1/4
    assert layer.quant_lambda.item() == 0.25
    w, lam = layer.weight.detach(), 0.25
    want = F.linear(x + lam * (_int8(x) - x), w + lam * (_ternary(w) - w))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_ramp_lambda_global_and_layerwise():
    assert [ramp_lambda(s, 4) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert ramp_lambda(3, 0) == 1.0
    # 3 layers over 6 steps: windows [0, 2), [2, 4), [4, 6)
    got = [[ramp_lambda(s, 6, "layerwise", i, 3) for i in range(3)] for s in (0, 1, 2, 3, 5, 6)]
    assert got == [[0, 0, 0], [0.5, 0, 0], [1, 0, 0], [1, 0.5, 0], [1, 1, 0.5], [1, 1, 1]]


def test_layerwise_schedule_follows_model_depth():
    _, quant = _pair("model.linear.ramp_steps=6", "model.linear.ramp=layerwise")
    set_quant_step(quant, 3)
    lams = {n: m.quant_lambda.item() for n, m in quant.named_modules() if isinstance(m, BitLinear)}
    assert {v for n, v in lams.items() if n.startswith("layers.0.")} == {1.0}
    assert {v for n, v in lams.items() if n.startswith("layers.1.")} == {0.5}
    assert {v for n, v in lams.items() if n.startswith("layers.2.")} == {0.0}


# ------------------------------------------------------------------ FP4 quantizer


def _groups(t, size):
    return t.reshape(-1, size).to(D)


def _on_grid(v, atol=0.0):
    """Each |v| equals an E2M1 value."""
    return ((v.abs()[..., None] - GRID).abs().min(-1).values <= atol).all()


def _power_of_two_scale(group):
    """The power-of-two s with group / s on the E2M1 grid, or None."""
    m = group.abs().max()
    if m == 0:
        return 1.0
    for g in GRID[1:]:
        s = (m / g).item()
        if s > 0 and math.log2(s) == round(math.log2(s)) and _on_grid(group / s):
            return s
    return None


@pytest.mark.parametrize("mode", ["quest", "absmax"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rtn", "sr"])
def test_mxfp4_outputs_are_e2m1_times_a_power_of_two_per_group(mode, stochastic):
    torch.manual_seed(0)
    x = torch.randn(6, 128) * torch.logspace(-3, 3, 6)[:, None]
    x[0, :32] = 0.0  # an all-zero group
    x[1, 32:64] = 0.7  # a constant group
    out, mask = Q.fp4_quantize(x, "mxfp4", mode=mode, stochastic=stochastic)
    assert out.dtype == x.dtype and mask.shape == x.shape
    for group in _groups(out, 32):
        assert _power_of_two_scale(group) is not None, group


def test_mxfp4_round_to_nearest_and_scale_follow_quartet():
    torch.manual_seed(1)
    x = torch.randn(8, 64, dtype=D) * 2
    out, mask = Q.fp4_quantize(x, "mxfp4", mode="quest")
    g = x.reshape(-1, 32)
    std = g.std(-1, unbiased=False, keepdim=True)
    s = 2.0 ** torch.floor(torch.log2(2.92247856 / 6 * std))  # Quartet's forward scale
    v = g / s
    # brute-force nearest E2M1 value (ties to the smaller magnitude), saturating at 6
    dist = (v.abs()[..., None] - GRID).abs()
    nearest = GRID[dist.argmin(-1)]  # argmin takes the first (smaller) on a tie
    torch.testing.assert_close(out.reshape(-1, 32), torch.sign(v) * nearest * s, rtol=0, atol=0)
    assert torch.equal(mask.reshape(-1, 32), v.abs() < 6)
    assert (~mask).any() and mask.any()  # both sides of the clip exercised


def test_absmax_mode_never_clips_and_uses_the_top_of_the_grid():
    x = torch.randn(16, 32, dtype=D) * 5
    out, mask = Q.fp4_quantize(x, "mxfp4", mode="absmax")
    assert mask.all()
    for xg, og in zip(x.reshape(-1, 32), out.reshape(-1, 32)):
        s = _power_of_two_scale(og)
        assert 3 < xg.abs().max() / s <= 6


def test_nvfp4_groups_of_16_with_e4m3_group_scales():
    torch.manual_seed(2)
    x = torch.randn(4, 64, dtype=D) * torch.logspace(-2, 2, 4, dtype=D)[:, None]
    out, mask = Q.fp4_quantize(x, "nvfp4", mode="absmax")
    s_t = x.abs().max() / (6 * 448)
    for xg, og in zip(x.reshape(-1, 16), out.reshape(-1, 16)):
        s_g = (xg.abs().max() / (6 * s_t)).float().to(torch.float8_e4m3fn).to(D)
        assert s_g > 0
        assert _on_grid(og / (s_g * s_t), atol=1e-9), og / (s_g * s_t)
    with pytest.raises(ValueError, match="multiple of the nvfp4 group 16"):
        Q.fp4_quantize(torch.randn(2, 24), "nvfp4")


def test_round_to_e2m1_ties_and_saturation():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -0.3, -100.0], dtype=D)
    want = torch.tensor([0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, -0.5, -6.0], dtype=D)
    assert torch.equal(Q.round_to_e2m1(v), want)


def test_stochastic_rounding_is_unbiased_and_picks_neighbours():
    gen = torch.Generator().manual_seed(3)
    v = torch.linspace(-6, 6, 97, dtype=D)
    draws = torch.stack([Q.stochastic_round_to_e2m1(v, gen) for _ in range(8000)])
    # every draw is one of the two grid neighbours of v
    lo = torch.stack([GRID[(GRID <= a + 1e-12).nonzero().max()] for a in v.abs()])
    hi = torch.stack([GRID[(GRID >= a - 1e-12).nonzero().min()] for a in v.abs()])
    assert ((draws.abs() == lo) | (draws.abs() == hi)).all()
    # the mean converges to v: per draw the variance is at most (spacing / 2)^2 = 1
    assert (draws.mean(0) - v).abs().max() < 5 / math.sqrt(8000)
    # and a whole quantizer with stochastic rounding is unbiased too
    x = torch.randn(4, 32, dtype=D)
    mean = torch.stack([Q.fp4_quantize(x, mode="absmax", stochastic=True, generator=gen)[0]
                        for _ in range(4000)]).mean(0)
    scale = x.abs().max()
    assert (mean - x).abs().max() < 5 * scale / 3 / math.sqrt(4000)


# ------------------------------------------------------------------ Hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 32])
def test_hadamard_matches_its_closed_form_and_is_orthogonal(n):
    h = Q.hadamard_matrix(n, dtype=D)
    closed = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                          dtype=D) / math.sqrt(n)
    assert torch.equal(h, closed)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=D), rtol=0, atol=1e-14)
    r = Q.random_hadamard(n, dtype=D, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(r @ r.t(), torch.eye(n, dtype=D), rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        Q.hadamard_matrix(24)


def test_block_rotation_inverse_restores_and_preserves_products():
    x = torch.randn(3, 5, 96, dtype=D)
    w = torch.randn(7, 96, dtype=D)
    h = Q.hadamard_matrix(32, dtype=D)
    xr, wr = Q.rotate(x, h), Q.rotate(w, h)
    torch.testing.assert_close(Q.rotate(xr, h.t()), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(xr @ wr.t(), x @ w.t(), rtol=1e-12, atol=1e-12)
    # the block structure: rotating one 32-wide block leaves the others alone
    e = torch.zeros(96, dtype=D)
    e[40] = 1.0
    assert (Q.rotate(e, h)[:32] == 0).all() and (Q.rotate(e, h)[64:] == 0).all()


# ------------------------------------------------------------------ FP4 linear


def _q_oracle(t):
    """Quartet's forward quantizer on t [..., K], rotated by H_32: values and clip mask."""
    h = Q.hadamard_matrix(32, dtype=D)
    tr = (t.reshape(*t.shape[:-1], -1, 32) @ h).reshape(-1, 32)
    std = tr.std(-1, unbiased=False, keepdim=True)
    s = 2.0 ** torch.floor(torch.log2(2.92247856 / 6 * std))
    v = tr / s
    q = torch.sign(v) * GRID[(v.abs()[..., None] - GRID).abs().argmin(-1)] * s
    return q.reshape(t.shape), (v.abs() < 6).reshape(t.shape)


def test_fp4_linear_forward_and_ste_backward_match_an_oracle():
    torch.manual_seed(4)
    layer = FP4Linear(64, 24, cfg=FP4LinearConfig(backward="ste")).to(D)
    x = torch.randn(3, 5, 64, dtype=D, requires_grad=True)
    y = layer(x)
    xq, mx = _q_oracle(x.detach())
    wq, mw = _q_oracle(layer.weight.detach())
    torch.testing.assert_close(y, xq @ wq.t(), rtol=1e-12, atol=1e-12)
    e = torch.randn_like(y)
    y.backward(e)
    h = Q.hadamard_matrix(32, dtype=D)

    def unrotate(t):
        return (t.reshape(*t.shape[:-1], -1, 32) @ h.t()).reshape(t.shape)

    gx = unrotate((e @ wq) * mx)
    gw = unrotate((e.reshape(-1, 24).t() @ xq.reshape(-1, 64)) * mw)
    torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-10, atol=1e-12)


def test_fp4_linear_quartet_backward_is_unbiased_around_the_ste_gradient():
    torch.manual_seed(5)
    ste = FP4Linear(32, 40, cfg=FP4LinearConfig(backward="ste")).to(D)
    qrt = FP4Linear(32, 40, cfg=FP4LinearConfig(backward="quartet")).to(D)
    qrt.load_state_dict(ste.state_dict())
    x = torch.randn(20, 32, dtype=D)  # 20 tokens and 40 outputs: both padded to 64
    e = torch.randn(20, 40, dtype=D)
    xs = x.clone().requires_grad_(True)
    ste(xs).backward(e)
    n = 1500
    gx = torch.zeros_like(x)
    gw = torch.zeros_like(ste.weight)
    for _ in range(n):
        xx = x.clone().requires_grad_(True)
        qrt.weight.grad = None
        qrt(xx).backward(e)
        gx += xx.grad / n
        gw += qrt.weight.grad / n
    rel_x = (gx - xs.grad).norm() / xs.grad.norm()
    rel_w = (gw - ste.weight.grad).norm() / ste.weight.grad.norm()
    assert rel_x < 0.05 and rel_w < 0.05, (rel_x, rel_w)
    # one draw is noisy (a real FP4 gradient), not the STE gradient
    xx = x.clone().requires_grad_(True)
    qrt(xx).backward(e)
    assert (xx.grad - xs.grad).norm() / xs.grad.norm() > 0.01


def test_fp4_linear_refuses_widths_that_do_not_split_into_groups():
    from neotron.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 32"):
        FP4Linear(48, 8)
    FP4Linear(48, 8, cfg=FP4LinearConfig(format="nvfp4", hadamard=16))


def test_compiled_bitlinear_follows_the_ramp_like_eager():
    # lam lives in a buffer under torch.compile (a Python float guard would recompile per step)
    torch.manual_seed(0)
    model = torch.nn.Sequential(BitLinear(32, 16, cfg=BitLinearConfig(ramp_steps=4)))
    x = torch.randn(4, 32)
    eager = []
    for step in range(6):
        set_quant_step(model, step)
        eager.append(model(x))
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(6):
        set_quant_step(model, step)
        assert torch.equal(compiled(x), eager[step]), step

"""TTT-Linear / TTT-MLP inner loops: the mini-batch dual form against the primal autograd
reference (Sun et al., arXiv 2407.04620), forward and every outer gradient, plus state chaining
and an independent check that the reference is gradient descent on the inner loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from neotron.kernels.ttt import ttt_eta, ttt_linear, ttt_mlp
from neotron.kernels.ttt.dual import gelu_tanh_grad, layer_norm_l2_grad

B, H, D = 2, 2, 8
EPS = 1e-6
# (mini_batch_size, T): multiples of b, a remainder, and a sequence shorter than one mini-batch.
SHAPES = [(16, 32), (16, 37), (16, 9), (4, 12), (4, 14)]
# Max-abs error relative to the max-abs reference value.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _make(kind: str, T: int, b: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """Leaf tensors (all requiring grad) in the layer's real parameterization, with the eta
    *parameters* (token offsets, lr logits) as leaves so their gradients are checked too."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    leaves = {
        "xq": rnd(B, H, T, D),
        "xk": rnd(B, H, T, D),
        "xv": rnd(B, H, T, D),
        # learnable offsets on token_eta_i = 1/i; small, so the clamp at 0 rarely engages
        "token_offset": rnd(b, scale=0.02),
        "lr_logits": rnd(B, H, T),
        "ln_weight": rnd(H, D, scale=0.1, shift=1.0),
        "ln_bias": rnd(H, D, scale=0.1),
    }
    if kind == "linear":
        leaves |= {"W0": rnd(H, D, D, scale=0.1), "b0": rnd(H, 1, D, scale=0.1)}
    else:
        leaves |= {
            "W1": rnd(H, D, 4 * D, scale=0.1),
            "b1": rnd(H, 1, 4 * D, scale=0.1),
            "W2": rnd(H, 4 * D, D, scale=0.1),
            "b2": rnd(H, 1, D, scale=0.1),
        }
    return {k: v.requires_grad_() for k, v in leaves.items()}


def _eta(p: dict[str, Tensor], b: int, base_lr: float = 1.0) -> Tensor:
    """The official parameterization: token_eta_i = clamp(1/i + offset_i, 0),
    lr_eta_j = base_lr * sigmoid(logit_j) / d."""
    idx = torch.arange(1, b + 1, dtype=p["xq"].dtype)
    token_eta = (1.0 / idx + p["token_offset"]).clamp_min(0.0)
    lr_eta = base_lr * torch.sigmoid(p["lr_logits"]) / D
    return ttt_eta(token_eta, lr_eta, b)


def _run(kind: str, p: dict[str, Tensor], b: int, impl: str, eta: Tensor | None = None, **kw):
    eta = _eta(p, b) if eta is None else eta
    weights = (p["W0"], p["b0"]) if kind == "linear" else (p["W1"], p["b1"], p["W2"], p["b2"])
    fn = ttt_linear if kind == "linear" else ttt_mlp
    return fn(
        p["xq"], p["xk"], p["xv"], eta, *weights, p["ln_weight"], p["ln_bias"],
        mini_batch_size=b, impl=impl, eps=EPS, **kw,
    )  # fmt: skip


def _loss_and_grads(kind: str, p: dict[str, Tensor], b: int, impl: str):
    """Forward, final state, and gradients of a random functional of both w.r.t. every leaf."""
    z, state = _run(kind, p, b, impl, output_final_state=True)
    g = torch.Generator().manual_seed(123)
    loss = (z * torch.randn(z.shape, generator=g, dtype=torch.float64).to(z)).sum()
    for s in state:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s)).sum()
    grads = torch.autograd.grad(loss, list(p.values()))
    return z, state, dict(zip(p, grads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("b,T", SHAPES, ids=[f"b{b}-T{t}" for b, t in SHAPES])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dual_matches_reference(kind: str, b: int, T: int, dtype: torch.dtype) -> None:
    p = _make(kind, T, b, dtype)
    z_d, s_d, g_d = _loss_and_grads(kind, p, b, "dual")
    z_r, s_r, g_r = _loss_and_grads(kind, p, b, "reference")
    assert z_d.dtype == dtype and z_d.shape == (B, H, T, D)
    # The inner loop must actually do something, or the comparison below proves nothing.
    assert _rel_err(z_r, p["xq"]) > 0.1
    tol = TOL[dtype]
    assert _rel_err(z_d, z_r) < tol
    for a, r in zip(s_d, s_r):
        assert a.shape[:2] == (B, H)
        assert _rel_err(a, r) < tol
    for name in p:
        assert g_r[name].abs().max() > 0, f"no gradient reaches {name}"
        assert _rel_err(g_d[name], g_r[name]) < tol, name


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fp32_dual_is_accurate(kind: str) -> None:
    """fp32 dual form against the fp64 reference: the fp32 inner loop loses no more than
    single-precision rounding."""
    b, T = 4, 14
    p64 = _make(kind, T, b, torch.float64)
    p32 = {k: v.detach().float().requires_grad_() for k, v in p64.items()}
    z_r, s_r, g_r = _loss_and_grads(kind, p64, b, "reference")
    z_d, s_d, g_d = _loss_and_grads(kind, p32, b, "dual")
    assert _rel_err(z_d, z_r) < 1e-5
    for a, r in zip(s_d, s_r):
        assert _rel_err(a, r) < 1e-5
    for name in p64:
        assert _rel_err(g_d[name], g_r[name]) < 1e-5, name


@pytest.mark.parametrize("impl", ["dual", "reference"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_state_chaining(kind: str, impl: str) -> None:
    """Two segments split at a mini-batch boundary, the second starting from the first's final
    state, reproduce one run: outputs, final states, and gradients through the carried state."""
    b, T, split = 4, 14, 8
    p = _make(kind, T, b, torch.float64)
    z, state, g = _loss_and_grads(kind, p, b, impl)

    eta = _eta(p, b)
    seg = {k: v for k, v in p.items()}
    first = {**seg, **{x: p[x][:, :, :split] for x in ("xq", "xk", "xv")}}
    second = {**seg, **{x: p[x][:, :, split:] for x in ("xq", "xk", "xv")}}
    z1, s1 = _run(kind, first, b, impl, eta=eta[:, :, : split // b], output_final_state=True)
    z2, s2 = _run(
        kind, second, b, impl, eta=eta[:, :, split // b :], initial_state=s1,
        output_final_state=True,
    )  # fmt: skip
    zc = torch.cat([z1, z2], dim=2)
    assert _rel_err(zc, z) < 1e-12
    for a, r in zip(s2, state):
        assert _rel_err(a, r) < 1e-12
    gen = torch.Generator().manual_seed(123)
    loss = (zc * torch.randn(zc.shape, generator=gen, dtype=torch.float64)).sum()
    for s in s2:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64)).sum()
    gc = torch.autograd.grad(loss, list(p.values()))
    for name, gr in zip(p, gc):
        assert _rel_err(gr, g[name]) < 1e-10, name


def _inner_forward(kind: str, x: Tensor, theta: list[Tensor]) -> Tensor:
    if kind == "linear":
        return x @ theta[0] + theta[1]
    W1, b1, W2, b2 = theta
    return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2


@pytest.mark.parametrize("impl", ["dual", "reference"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_token_step_is_gradient_descent(kind: str, impl: str) -> None:
    """With eta non-zero only for token 0's gradient, every token of the first mini-batch uses
    theta_0 - eta_i0 * grad l(theta_0; x_0), and later mini-batches (eta = 0) keep the weights of
    the last token. The gradient is computed here independently, one (batch, head) at a time."""
    b, T = 4, 8
    p = {k: v.detach() for k, v in _make(kind, T, b, torch.float64).items()}
    c = torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    eta = torch.zeros(B, H, T // b, b, b, dtype=torch.float64)
    eta[:, :, 0, :, 0] = c
    names = ["W0", "b0"] if kind == "linear" else ["W1", "b1", "W2", "b2"]
    z, state = _run(kind, p, b, impl, eta=eta, output_final_state=True)

    for bi in range(B):
        for h in range(H):
            lw, lb = p["ln_weight"][h], p["ln_bias"][h]

            def ln(u: Tensor, lw: Tensor = lw, lb: Tensor = lb) -> Tensor:
                return F.layer_norm(u, (D,), eps=EPS) * lw + lb

            theta0 = [p[n][h].clone().requires_grad_() for n in names]
            k0, v0 = p["xk"][bi, h, :1], p["xv"][bi, h, :1]

            def inner_loss(theta: list[Tensor], k0: Tensor = k0, v0: Tensor = v0) -> Tensor:
                return 0.5 * (ln(_inner_forward(kind, k0, theta)) - (v0 - k0)).pow(2).sum()

            grads = torch.autograd.grad(inner_loss(theta0), theta0)
            with torch.no_grad():
                for i in range(T):
                    step = c[min(i, b - 1)]  # tokens of mini-batch 1 keep theta_b (= row b-1)
                    theta_i = [t - step * gr for t, gr in zip(theta0, grads)]
                    q = p["xq"][bi, h, i : i + 1]
                    expected = q + ln(_inner_forward(kind, q, theta_i))
                    assert _rel_err(z[bi, h, i : i + 1], expected) < 1e-10
                theta_b = [t - c[-1] * gr for t, gr in zip(theta0, grads)]
                for s, t in zip(state, theta_b):
                    assert _rel_err(s[bi, h], t) < 1e-10
                # A small step in the negative gradient direction lowers token 0's inner loss.
                small = [t - 1e-3 * gr for t, gr in zip(theta0, grads)]
                assert inner_loss(small) < inner_loss(theta0)


def test_closed_form_inner_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(16, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(16, generator=g, dtype=torch.float64)
    loss = 0.5 * (F.layer_norm(z, (16,), w, b, eps=EPS) - target).pow(2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    assert _rel_err(layer_norm_l2_grad(z, target, w, b, EPS), auto) < 1e-12

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert _rel_err(gelu_tanh_grad(x), auto) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_comparison_detects_wrong_eta_use(kind: str) -> None:
    """Mutation check: a kernel that read the upper triangle (eta transposed) must fail the
    dual-vs-reference comparison; only the lower triangle is read, so triu noise is ignored."""
    b, T = 4, 14
    p = {k: v.detach() for k, v in _make(kind, T, b, torch.float64).items()}
    eta = _eta(p, b)
    z_ref, _ = _run(kind, p, b, "reference", eta=eta)
    z_bad, _ = _run(kind, p, b, "dual", eta=eta.transpose(-1, -2))
    assert _rel_err(z_bad, z_ref) > 1e-3
    noise = torch.triu(torch.rand(eta.shape, dtype=eta.dtype), diagonal=1)
    for impl in ("dual", "reference"):
        z_noisy, _ = _run(kind, p, b, impl, eta=eta + noise)
        assert _rel_err(z_noisy, z_ref) < 1e-12


def test_ttt_eta_factorization() -> None:
    b, T = 4, 10
    tok = torch.rand(H, b, dtype=torch.float64)
    lr = torch.rand(B, H, T, dtype=torch.float64)
    eta = ttt_eta(tok, lr, b)
    assert eta.shape == (B, H, 3, b, b)
    for n in range(3):
        for i in range(b):
            for j in range(b):
                t = n * b + j
                want = tok[:, i] * lr[:, :, t] if t < T else torch.zeros(B, H, dtype=eta.dtype)
                torch.testing.assert_close(eta[:, :, n, i, j], want, rtol=0, atol=0)
    # A [b] token_eta is shared by all heads.
    torch.testing.assert_close(ttt_eta(tok[0], lr, b), ttt_eta(tok[0].expand(H, b), lr, b))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_low_precision_inputs_run_in_fp32(kind: str) -> None:
    b, T = 4, 10
    p = {k: v.detach() for k, v in _make(kind, T, b, torch.float32).items()}
    eta = _eta(p, b)
    p16 = {k: (v.bfloat16() if k in ("xq", "xk", "xv") else v) for k, v in p.items()}
    z16, state = _run(kind, p16, b, "dual", eta=eta, output_final_state=True)
    assert z16.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state)
    # Bit-identical to the fp32 computation on the same (bf16-representable) values.
    p32 = {k: (v.float() if k in ("xq", "xk", "xv") else v) for k, v in p16.items()}
    z32, _ = _run(kind, p32, b, "dual", eta=eta)
    assert torch.equal(z16, z32.bfloat16())


def test_broadcast_eta_and_no_grad_reference() -> None:
    b, T = 4, 10
    p = {k: v.detach() for k, v in _make("linear", T, b, torch.float64).items()}
    eta1 = _eta(p, b)[:1, :1]
    z_bc, _ = _run("linear", p, b, "dual", eta=eta1)
    z_full, _ = _run("linear", p, b, "dual", eta=eta1.expand(B, H, -1, -1, -1))
    assert torch.equal(z_bc, z_full)
    with torch.no_grad():
        z_ref, _ = _run("linear", p, b, "reference", eta=eta1)
    assert _rel_err(z_ref, z_full) < 1e-12 and not z_ref.requires_grad


def test_bad_arguments() -> None:
    b, T = 4, 10
    p = {k: v.detach() for k, v in _make("linear", T, b, torch.float64).items()}
    eta = _eta(p, b)
    with pytest.raises(ValueError, match="eta must be"):
        _run("linear", p, b, "dual", eta=eta[:, :, :2])
    with pytest.raises(ValueError, match="impl must be"):
        _run("linear", p, b, "triton")
    with pytest.raises(ValueError, match="initial_state"):
        _run("linear", p, b, "dual", initial_state=(p["W0"], p["b0"]))  # no batch dim
    with pytest.raises(ValueError, match="ln_weight"):
        _run("linear", {**p, "ln_weight": p["ln_weight"][0]}, b, "dual")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dual_on_cuda_matches_cpu(kind: str) -> None:
    """The dispatch runs the dual form on CUDA too: same numbers as on CPU (fp32, no TF32)."""
    b, T = 16, 37
    p = _make(kind, T, b, torch.float32)
    z_c, s_c, g_c = _loss_and_grads(kind, p, b, "auto")
    pg = {k: v.detach().cuda().requires_grad_() for k, v in p.items()}
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        z_g, s_g, g_g = _loss_and_grads(kind, pg, b, "auto")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert z_g.is_cuda
    assert _rel_err(z_g.cpu(), z_c) < 1e-5
    for a, r in zip(s_g, s_c):
        assert _rel_err(a.cpu(), r) < 1e-5
    for name in p:
        assert _rel_err(g_g[name].cpu(), g_c[name]) < 1e-5, name

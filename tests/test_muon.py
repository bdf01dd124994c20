"""Tests for neotron.optim: Newton-Schulz, Muon, NorMuon (single device).

Oracles: torch.optim.Muon (same settings, same grads); the scalar quintic p applied to singular
values; NorMuon's definition written out row by row below; an uninterrupted run for resume.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from neotron.optim.muon import Muon, lr_scale, muon_update
from neotron.optim.newton_schulz import NS_COEFFICIENTS, zeropower_via_newtonschulz5
from neotron.optim.normuon import NorMuon

NS = zeropower_via_newtonschulz5
SHAPES = [(48, 24), (24, 72), (32, 32)]  # tall, wide, square
STEPS = 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quintic5(x: torch.Tensor) -> torch.Tensor:
    """The scalar map NS applies to each singular value of G / ||G||_F (5 steps)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    return x


def _params_and_grads(shapes, n_steps: int, seed: int = 0):
    g = _gen(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(n_steps)]
    return params, grads


def _run(opt_cls, params, grads, **kw):
    """Fresh copies of ``params`` stepped once per entry of ``grads``; returns (params, opt)."""
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = opt_cls(ps, **kw)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


# ----------------------------------------------------------------------------- Newton-Schulz


def test_ns_matches_torch_newton_schulz_bitwise():
    # We follow torch's op sequence (bf16 cast, transpose, norm, addmm x2); the one difference,
    # norm + eps vs clamp(norm, eps), is invisible for norms >= ~3e-5 in bf16.
    muon_mod = pytest.importorskip("torch.optim._muon")
    torch_ns = getattr(muon_mod, "_zeropower_via_newtonschulz", None)
    if torch_ns is None:
        pytest.skip("torch's private NS function moved")
    g = _gen(1)
    for shape in [*SHAPES, (5, 130)]:
        G = torch.randn(shape, generator=g)
        assert torch.equal(NS(G), torch_ns(G, NS_COEFFICIENTS, 5, 1e-7).float())


@pytest.mark.parametrize("compute_dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.03)])
@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (100, 100)])
def test_ns_singular_values_follow_the_quintic(shape, compute_dtype, atol):
    # NS(G) = U p^5(S/||G||_F) V^T. Exact up to fp32 rounding in fp32 (measured dev ~1e-6);
    # bf16 rounding moves singular values by up to ~0.015 (measured), hence 0.03.
    G = torch.randn(shape, generator=_gen(2), dtype=torch.float64).float()
    s_in = torch.linalg.svdvals(G.double())
    predicted = _quintic5(s_in / torch.linalg.matrix_norm(G.double())).sort().values
    s_out = torch.linalg.svdvals(NS(G, compute_dtype=compute_dtype).double()).sort().values
    torch.testing.assert_close(s_out, predicted, atol=atol, rtol=0)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (256, 96), (60, 200), (96, 96)])
def test_ns_singular_value_band(shape, in_dtype):
    # Band asserted: [0.67, 1.21]. Why: p^5 maps every x in [2e-3, 1] into [0.682, 1.203]
    # (scalar computation), and bf16 moves values by < 0.015. A rectangular Gaussian matrix has
    # all normalized singular values well above 2e-3, so *all* of its singular values land in
    # the band (measured [0.680, 1.14]). A square Gaussian has a few tiny ones (density near 0)
    # that 5 steps cannot lift (gain at 0 is a^5 ~ 486): those are the only ones allowed out,
    # and none may exceed 1.21. (Jordan's "~U(0.5, 1.5)" is for ill-conditioned real gradients.)
    G = torch.randn(shape, generator=_gen(3)).to(in_dtype)
    s_out = torch.linalg.svdvals(NS(G).double())
    assert s_out.max() <= 1.21
    x = torch.linalg.svdvals(G.double()) / torch.linalg.matrix_norm(G.double())
    n_tiny = int((x < 2e-3).sum())
    if shape[0] != shape[1]:
        assert n_tiny == 0
    assert int((s_out < 0.67).sum()) <= n_tiny
    assert s_out.min() >= 0.67 or shape[0] == shape[1]


def test_ns_scale_invariance():
    G = torch.randn(40, 24, generator=_gen(4))
    # A power of two commutes with every rounding (bf16 cast, norm, division): bit-identical.
    for c in (8.0, 2.0**-10):
        assert torch.equal(NS(c * G), NS(G))
    # Any other c changes the bf16 rounding of the input: equal up to bf16 noise; in fp32 tight.
    torch.testing.assert_close(NS(0.37 * G), NS(G), atol=0.02, rtol=0)
    f32 = torch.float32
    torch.testing.assert_close(
        NS(0.37 * G, compute_dtype=f32), NS(G, compute_dtype=f32), atol=1e-5, rtol=0
    )


def test_ns_transpose_equivariance():
    g = _gen(5)
    for shape in [(40, 24), (24, 40)]:
        # Rectangular: NS works on the wide orientation either way, so it is the same computation.
        G = torch.randn(shape, generator=g)
        assert torch.equal(NS(G.T), NS(G).T)
    G = torch.randn(32, 32, generator=g)  # square: X X^T vs X^T X, equal up to rounding
    torch.testing.assert_close(NS(G.T), NS(G).T, atol=0.02, rtol=0)
    torch.testing.assert_close(
        NS(G.T, compute_dtype=torch.float32),
        NS(G, compute_dtype=torch.float32).T,
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("shape", [(4, 40, 24), (2, 3, 24, 40)])
def test_ns_batched_equals_loop(shape):
    # bmm/baddbmm vs mm/addmm: identical on CPU here (measured 0); asserted at bf16-NS level.
    G = torch.randn(shape, generator=_gen(6))
    out = NS(G)
    assert out.shape == G.shape
    looped = torch.stack([NS(m) for m in G.reshape(-1, *shape[-2:])]).reshape(shape)
    torch.testing.assert_close(out, looped, atol=0.02, rtol=0)


def test_ns_dtype_zero_and_bad_input():
    G = torch.randn(16, 8, generator=_gen(7))
    out = NS(G)
    assert out.dtype == torch.float32
    assert torch.equal(out, out.bfloat16().float())  # values are bf16 numbers, upcast exactly
    assert NS(G.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(NS(torch.zeros(6, 4)), torch.zeros(6, 4))  # eps: 0 -> 0, not NaN
    Gb = G.bfloat16()
    NS(Gb)
    assert torch.equal(Gb, G.bfloat16())  # input not modified in place
    with pytest.raises(ValueError, match="matrix"):
        NS(torch.randn(5))


# ----------------------------------------------------------------------------- Muon


def test_lr_scale():
    assert lr_scale((48, 24), "original") == math.sqrt(2)
    assert lr_scale((24, 48), "original") == 1.0
    assert lr_scale((24, 48), "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(48))
    with pytest.raises(ValueError, match="adjust_lr"):
        lr_scale((2, 2), "spectral")  # type: ignore[arg-type]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon(adjust_lr, nesterov):
    # Bit for bit: on CPU Muon runs torch.optim.Muon's exact op sequence (same fp32 lerp
    # momentum, same bf16 Newton-Schulz ops and eps, same lr adjustment and decoupled decay), so
    # any difference at all is a change of the math. Measured max |difference|: 0.0 for every
    # case here (torch 2.13, CPU). This is what catches e.g. a 5% error in the step size, which
    # a bf16-sized tolerance (the old ~5e-3) let through.
    params, grads = _params_and_grads(SHAPES, STEPS, seed=10)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    ours, our_opt = _run(Muon, params, grads, adjust_lr=adjust_lr, **kw)
    ref, ref_opt = _run(torch.optim.Muon, params, grads, adjust_lr_fn=adjust_lr, **kw)
    for p, q, shape in zip(ours, ref, SHAPES):
        assert torch.equal(our_opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
        diff = (p - q).abs().max().item()
        assert torch.equal(p.detach(), q.detach()), (
            f"{shape} ({adjust_lr}, nesterov={nesterov}): max |ours - torch.optim.Muon| = {diff}"
        )


def test_bf16_params_momentum_buffer_not_normalized_in_place():
    # torch.optim.Muon 2.13 with bf16 params and nesterov=False hands its momentum buffer itself
    # to NS, whose .bfloat16() is then a no-op and whose in-place div_ normalizes the buffer.
    # Ours never writes into the NS input: the buffer stays (1 - mu) * g after one step.
    g = torch.randn(16, 8, generator=_gen(16)).bfloat16() * 10
    p = torch.randn(16, 8, generator=_gen(17)).bfloat16().requires_grad_(True)
    opt = Muon([p], lr=0.02, nesterov=False)
    p.grad = g.clone()
    opt.step()
    expected = torch.zeros_like(g).lerp_(g, 1 - 0.95)
    assert torch.equal(opt.state[p]["momentum_buffer"], expected)
    assert p.dtype == torch.bfloat16


def test_muon_per_group_hyperparameters():
    params, grads = _params_and_grads(SHAPES[:2], 3, seed=11)
    g1 = dict(
        lr=0.03, weight_decay=0.0, momentum=0.9, nesterov=False, ns_steps=3, adjust_lr="original"
    )
    g2 = dict(lr=1e-3, weight_decay=0.1)  # defaults otherwise
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = Muon([{"params": [ps[0]], **g1}, {"params": [ps[1]]}], **g2)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    alone0, _ = _run(Muon, params[:1], [s[:1] for s in grads], **g1)
    alone1, _ = _run(Muon, params[1:], [s[1:] for s in grads], **g2)
    assert torch.equal(ps[0], alone0[0]) and torch.equal(ps[1], alone1[0])


def test_muon_skips_params_without_grad_and_zero_grad_is_finite():
    p, q = torch.randn(8, 4, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    p0, q0 = p.detach().clone(), q.detach().clone()
    opt = NorMuon([p, q], lr=0.1, weight_decay=0.1)
    p.grad = torch.zeros_like(p)  # q.grad stays None
    opt.step()
    assert q not in opt.state and torch.equal(q, q0)  # no decay without a grad
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.1))  # decay only, no NaN
    assert all(torch.isfinite(t).all() for t in opt.state[p].values())


def test_muon_update_pure_function_batched():
    # The pure function the distributed version will call on an owner rank: same result as the
    # optimizer's direction, buffer advanced in place, batched over same-shape matrices.
    _, grads = _params_and_grads([(3, 16, 8)], 2, seed=12)
    buf = torch.zeros(3, 16, 8)
    bufs = [torch.zeros(16, 8) for _ in range(3)]
    for (g,) in grads:
        out = muon_update(g, buf)
        looped = torch.stack([muon_update(g[i], bufs[i]) for i in range(3)])
        torch.testing.assert_close(out, looped, atol=0.02, rtol=0)
    torch.testing.assert_close(buf, torch.stack(bufs), atol=0, rtol=0)


# ----------------------------------------------------------------------------- NorMuon


def _normuon_by_definition(W0, grads, *, lr, wd, mu, beta2, eps, adjust_lr):
    """NorMuon written out plainly; float64 except the shared bf16 Newton-Schulz."""
    W = W0.double().clone()
    rows, cols = W.shape
    buf = torch.zeros(rows, cols)
    v = torch.zeros(rows, dtype=torch.float64)
    history = []
    for g in grads:
        # Momentum with the same fp32 lerp ops as the optimizer, so NS sees identical input
        # (NS is tested against torch above; here the point is the normalization).
        buf = torch.lerp(buf, g, 1 - mu)
        u = torch.lerp(g, buf, mu)
        ortho = NS(u).double()
        O_hat = torch.empty_like(ortho)
        for i in range(rows):
            mean_sq = sum(ortho[i, j] ** 2 for j in range(cols)) / cols
            v[i] = beta2 * v[i] + (1 - beta2) * mean_sq  # EMA, no bias correction
            O_hat[i] = ortho[i] / (math.sqrt(v[i]) + eps)
        O_hat = O_hat * (torch.linalg.norm(ortho) / torch.linalg.norm(O_hat))  # Frobenius rescale
        W = W * (1 - lr * wd) - lr * lr_scale(W.shape, adjust_lr) * O_hat
        history.append((W.clone(), v.clone()))
    return history


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_normuon_matches_definition(adjust_lr):
    shapes = [(20, 12), (12, 20), (16, 16)]
    params, grads = _params_and_grads(shapes, 3, seed=13)
    hp = dict(lr=0.02, weight_decay=0.1, momentum=0.95, beta2=0.95)
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = NorMuon(ps, adjust_lr=adjust_lr, norm_eps=1e-10, **hp)
    refs = [
        _normuon_by_definition(
            params[k],
            [s[k] for s in grads],
            lr=hp["lr"],
            wd=hp["weight_decay"],
            mu=hp["momentum"],
            beta2=hp["beta2"],
            eps=1e-10,
            adjust_lr=adjust_lr,
        )
        for k in range(len(shapes))
    ]
    for t, step_grads in enumerate(grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
        for k, p in enumerate(ps):
            W_ref, v_ref = refs[k][t]
            torch.testing.assert_close(p.detach().double(), W_ref, atol=2e-6, rtol=0)
            v = opt.state[p]["second_momentum"]
            assert v.shape == (shapes[k][0], 1)
            torch.testing.assert_close(v.double().squeeze(1), v_ref, rtol=1e-5, atol=0)
    # Teeth: the normalization changes the result well beyond the tolerance above.
    muon_ps, _ = _run(
        Muon, params, grads, adjust_lr=adjust_lr, lr=hp["lr"], weight_decay=hp["weight_decay"]
    )
    assert max((a - b).abs().max().item() for a, b in zip(ps, muon_ps)) > 1e-3


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_state_dict_round_trip(opt_cls):
    params, grads = _params_and_grads(SHAPES, STEPS, seed=14)
    kw = dict(lr=0.02, weight_decay=0.1)
    straight, _ = _run(opt_cls, params, grads, **kw)

    first, opt = _run(opt_cls, params, grads[:2], **kw)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and plain values only: no pickled objects
    expected = {"momentum_buffer"} | ({"second_momentum"} if opt_cls is NorMuon else set())
    assert all(set(s) == expected for s in saved["optim"]["state"].values())

    resumed_ps = [p.clone().requires_grad_(True) for p in saved["params"]]
    fresh = opt_cls(resumed_ps, **kw)
    fresh.load_state_dict(saved["optim"])
    for step_grads in grads[2:]:
        for p, g in zip(resumed_ps, step_grads):
            p.grad = g.clone()
        fresh.step()
    for a, b in zip(straight, resumed_ps):
        assert torch.equal(a, b)


def test_dcp_round_trip(tmp_path):
    # The trainer checkpoints optimizers through torch.distributed.checkpoint; single process.
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 4, bias=False)
        )

    x = torch.randn(5, 8, generator=_gen(15))
    model, model2 = make(), make()
    opt = NorMuon(model.parameters(), lr=0.02)
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    model2.load_state_dict(model.state_dict())
    opt2 = NorMuon(model2.parameters(), lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: single-process save/load"
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        # get_optimizer_state_dict allocates state with a zero-grad, lr=0 step: must not move W.
        target = {"optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(target, checkpoint_id=tmp_path)
        set_optimizer_state_dict(model2, opt2, target["optim"])
    for _ in range(2):
        for m, o in ((model, opt), (model2, opt2)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
@pytest.mark.parametrize("shape", [(8,), (), (4, 3, 3)])
def test_bad_param_shape_errors_clearly(opt_cls, shape):
    with pytest.raises(ValueError, match=r"2-D.*AdamW"):
        opt_cls([torch.zeros(shape, requires_grad=True)])


def test_bad_param_named_and_added_group_rolled_back():
    w = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="'blocks.0.norm.weight'"):
        Muon([("blocks.0.mlp.w1", w), ("blocks.0.norm.weight", torch.zeros(4, requires_grad=True))])
    opt = Muon([w])
    with pytest.raises(ValueError, match="shape"):
        opt.add_param_group({"params": [torch.zeros(2, 2, 2, requires_grad=True)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(adjust_lr="spectral_norm"), "adjust_lr"),
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(beta2=1.5), "beta2"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        NorMuon([torch.zeros(4, 4, requires_grad=True)], **kw)


def test_dtensor_layouts_accepted_or_rejected_clearly():
    # Shard(0) (FSDP2) and Replicate() are handled by the owner-rank path (tested with 2 real
    # processes in tests/test_muon_distributed.py); a shard along another dim (tensor parallel)
    # cannot be assembled into whole rows and is refused when the group is added.
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        pytest.skip("torch's fake process group moved")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        local = torch.randn(4, 8)
        for placement in (Shard(0), Replicate()):
            dt = DTensor.from_local(local, mesh, [placement], run_check=False)
            NorMuon([torch.nn.Parameter(dt)])
        by_cols = DTensor.from_local(local, mesh, [Shard(1)], run_check=False)
        with pytest.raises(NotImplementedError, match=r"Shard\(dim=1\).*not supported"):
            Muon([torch.nn.Parameter(by_cols)])
    finally:
        dist.destroy_process_group()

"""Delta-rule and gated-delta-rule kernels: the chunked (WY/UT) path against the token-by-token
reference, forward and backward, plus the contracts the layers rely on (varlen packing, state
chaining, g = 0, dispatch). Shapes are small: the reference is a Python loop over tokens."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import neotron.kernels as kernels
from neotron.kernels.delta_rule import delta_rule, delta_rule_chunked, delta_rule_reference
from neotron.kernels.delta_rule.varlen import pack_plan
from neotron.kernels.gated_delta_rule import (
    gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_reference,
)

dr_pkg = importlib.import_module("neotron.kernels.delta_rule")
F64, F32 = torch.float64, torch.float32
# (batch, time, heads, d_k, d_v, chunk_size): T not a multiple of C, T == C, T < C, many chunks,
# and an odd chunk size.
SHAPES = [
    (2, 50, 2, 8, 6, 16),
    (1, 64, 2, 16, 16, 64),
    (2, 37, 3, 8, 8, 64),
    (1, 130, 1, 8, 8, 16),
    (1, 23, 2, 4, 5, 5),
]
TOL = {F64: 1e-10, F32: 1e-4}


def make_inputs(
    b: int, t: int, h: int, dk: int, dv: int, dtype: torch.dtype, seed: int = 0, n_state: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs as a layer gives them: L2-normalized q and k, sigmoid beta, log-sigmoid gate."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    x = {
        "q": F.normalize(rnd(b, t, h, dk), dim=-1),
        "k": F.normalize(rnd(b, t, h, dk), dim=-1),
        "v": rnd(b, t, h, dv),
        "g": F.logsigmoid(rnd(b, t, h) + 2.0),  # decays mostly in (0.5, 1)
        "beta": rnd(b, t, h).sigmoid(),
        "s0": rnd(n_state or b, h, dk, dv),
    }
    return {n: y.to(dtype).requires_grad_() for n, y in x.items()}


def run(gated: bool, impl: str, x: dict, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    if gated:
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl=impl, **kw)
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=impl, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.isfinite(a).all(), what
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative max error {err:.3e} > {tol:.1e}"


def grads(gated: bool, impl: str, x: dict, seed: int = 1, **kw) -> dict[str, torch.Tensor]:
    """Gradients of a random linear function of (o, final_state) w.r.t. every input."""
    o, s = run(gated, impl, x, initial_state=x["s0"], output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=F64).to(s.dtype)
    names = ["q", "k", "v", "beta", "s0"] + (["g"] if gated else [])
    gs = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [x[n] for n in names])
    return dict(zip(names, gs))


# ---------------------------------------------------------------- chunked vs reference


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[1]}C{s[5]}" for s in SHAPES])
def test_chunked_matches_reference(gated: bool, dtype: torch.dtype, shape: tuple) -> None:
    b, t, h, dk, dv, c = shape
    x = make_inputs(b, t, h, dk, dv, dtype)
    kw = {"initial_state": x["s0"], "output_final_state": True}
    o_ref, s_ref = run(gated, "reference", x, **kw)
    o_chk, s_chk = run(gated, "chunked", x, chunk_size=c, **kw)
    assert o_chk.dtype == dtype and s_chk.dtype == dtype
    assert_rel(o_chk, o_ref, TOL[dtype], "o")
    assert_rel(s_chk, s_ref, TOL[dtype], "final_state")

    g_ref = grads(gated, "reference", x)
    g_chk = grads(gated, "chunked", x, chunk_size=c)
    for name in g_ref:
        assert_rel(g_chk[name], g_ref[name], 10 * TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_layer_like_fp32_against_fp64_reference(gated: bool) -> None:
    # A longer fp32 run at the default chunk size against the fp64 oracle: the real error of the
    # fp32 chunked path, not just agreement of two fp32 computations.
    x64 = make_inputs(2, 200, 2, 32, 32, F64, seed=3)
    x32 = {n: y.detach().float() for n, y in x64.items()}
    kw = {"output_final_state": True}
    o_ref, s_ref = run(gated, "reference", x64, initial_state=x64["s0"], **kw)
    o, s = run(gated, "chunked", x32, initial_state=x32["s0"], **kw)
    assert_rel(o.double(), o_ref, 1e-4, "o")
    assert_rel(s.double(), s_ref, 1e-4, "final_state")


def test_gated_strong_decay_is_stable() -> None:
    # Cumulative log decay reaches -64 * 30 inside a chunk: exp of the raw cumulative sums (or of
    # their unmasked differences) would underflow/overflow and poison the result with NaN/inf.
    x = make_inputs(1, 100, 2, 8, 8, F32, seed=4)
    with torch.no_grad():
        x["g"].copy_(-30.0 * torch.rand_like(x["g"]))
    o_ref, s_ref = run(True, "reference", x, initial_state=x["s0"], output_final_state=True)
    o, s = run(True, "chunked", x, initial_state=x["s0"], output_final_state=True)
    assert_rel(o, o_ref, 1e-4, "o")
    assert_rel(s, s_ref, 1e-4, "final_state")
    for name, gr in grads(True, "chunked", x).items():
        assert torch.isfinite(gr).all(), name


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_gradcheck_chunked(gated: bool) -> None:
    x = make_inputs(1, 7, 1, 3, 2, F64, seed=5)
    names = ["q", "k", "v", "beta", "s0"] + (["g"] if gated else [])

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = dict(zip(names, args))
        if gated:
            return gated_delta_rule_chunked(
                y["q"],
                y["k"],
                y["v"],
                y["g"],
                y["beta"],
                initial_state=y["s0"],
                output_final_state=True,
                chunk_size=3,
            )
        return delta_rule_chunked(
            y["q"],
            y["k"],
            y["v"],
            y["beta"],
            initial_state=y["s0"],
            output_final_state=True,
            chunk_size=3,
        )

    assert torch.autograd.gradcheck(fn, tuple(x[n] for n in names))


# ---------------------------------------------------------------- semantics (hand-computed)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_delta_rule_overwrites_instead_of_accumulating(impl: str) -> None:
    # One-hot keys, beta = 1, scale = 1: writing key e0 twice must *replace* the stored value
    # (linear attention would return the sum), and key e1 keeps its own value.
    v = torch.tensor([[1.0, 2.0], [5.0, -1.0], [3.0, 3.0], [0.0, 0.0]], dtype=F64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=F64)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=F64)
    beta = torch.ones(1, 4, 1, dtype=F64)
    o, s = delta_rule(
        q[None, :, None],
        k[None, :, None],
        v[None, :, None],
        beta,
        scale=1.0,
        output_final_state=True,
        impl=impl,
        chunk_size=2,
    )
    torch.testing.assert_close(s[0, 0], torch.tensor([[3.0, 3.0], [5.0, -1.0]], dtype=F64))
    torch.testing.assert_close(o[0, 3, 0], torch.tensor([8.0, 2.0], dtype=F64))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gate_decays_the_state(impl: str) -> None:
    # beta = 0 (no writes), g = log(0.5): the state halves every token, o_t = 0.5^(t+1) S0^T q.
    x = make_inputs(1, 9, 2, 4, 3, F64, seed=6)
    g = torch.full((1, 9, 2), torch.log(torch.tensor(0.5)).item(), dtype=F64)
    o, s = gated_delta_rule(
        x["q"],
        x["k"],
        x["v"],
        g,
        torch.zeros(1, 9, 2, dtype=F64),
        scale=1.0,
        initial_state=x["s0"],
        output_final_state=True,
        impl=impl,
        chunk_size=4,
    )
    s0 = x["s0"].detach()
    want = torch.einsum("bthk,bhkv->bthv", x["q"].detach(), s0)
    want = want * (0.5 ** torch.arange(1, 10, dtype=F64))[None, :, None, None]
    torch.testing.assert_close(o, want)
    torch.testing.assert_close(s, s0 * 0.5**9)


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gated_with_zero_gate_equals_ungated(impl: str) -> None:
    x = make_inputs(2, 45, 2, 8, 8, F64, seed=7)
    kw = {"initial_state": x["s0"], "output_final_state": True, "chunk_size": 16}
    o1, s1 = delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=impl, **kw)
    zero = torch.zeros_like(x["g"])
    o2, s2 = gated_delta_rule(x["q"], x["k"], x["v"], zero, x["beta"], impl=impl, **kw)
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_state_chaining(gated: bool, impl: str) -> None:
    # Two halves with the carried state equal one run (split inside a chunk on purpose).
    x = make_inputs(2, 70, 2, 8, 6, F64, seed=8)
    kw = {"output_final_state": True, "chunk_size": 16}
    o, s = run(gated, impl, x, initial_state=x["s0"], **kw)
    cut = 29
    first = {n: (y[:, :cut] if n != "s0" else y) for n, y in x.items()}
    second = {n: (y[:, cut:] if n != "s0" else y) for n, y in x.items()}
    o1, s1 = run(gated, impl, first, initial_state=x["s0"], **kw)
    o2, s2 = run(gated, impl, second, initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s, rtol=1e-10, atol=1e-10)


def test_final_state_only_on_request_and_default_scale() -> None:
    x = make_inputs(1, 20, 2, 16, 8, F64, seed=9)
    for gated in (False, True):
        for impl in ("reference", "chunked"):
            o, s = run(gated, impl, x)
            assert s is None
            o_s, _ = run(gated, impl, x, scale=16**-0.5)
            torch.testing.assert_close(o, o_s, rtol=0, atol=0)
            o_2, _ = run(gated, impl, x, scale=1.0)
            assert not torch.allclose(o, o_2)  # scale really multiplies q


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_varlen_equals_separate_documents(gated: bool) -> None:
    # Five documents packed into batch 1, incl. a 1-token document; at chunk 16 they need 1, 3,
    # 1, 2, 2 chunks and get packed into 3 rows, several documents per row, so the state must
    # reset in the middle of a row.
    cu = torch.tensor([0, 5, 40, 41, 70, 100])
    n = len(cu) - 1
    plan = pack_plan(cu.tolist(), 16, torch.device("cpu"))
    assert plan.rows == 3 and plan.chunks == 3 and plan.resets  # the packing is exercised
    x = make_inputs(1, 100, 2, 8, 6, F64, seed=10, n_state=n)
    kw = {"initial_state": x["s0"], "output_final_state": True, "chunk_size": 16}

    o_ref, s_ref = run(gated, "reference", x, cu_seqlens=cu, **kw)
    o_chk, s_chk = run(gated, "chunked", x, cu_seqlens=cu, **kw)
    assert s_chk.shape == (n, 2, 8, 6)
    assert_rel(o_chk, o_ref, 1e-10, "o")
    assert_rel(s_chk, s_ref, 1e-10, "final_state")

    # Each document on its own (no cu_seqlens) gives the same outputs and final states.
    for impl, (o_all, s_all) in (("reference", (o_ref, s_ref)), ("chunked", (o_chk, s_chk))):
        for i in range(n):
            sl = slice(int(cu[i]), int(cu[i + 1]))
            doc = {m: (y[:, sl] if m != "s0" else y) for m, y in x.items()}
            o_i, s_i = run(
                gated,
                impl,
                doc,
                initial_state=x["s0"][i : i + 1],
                output_final_state=True,
                chunk_size=16,
            )
            torch.testing.assert_close(o_all[:, sl], o_i, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(s_all[i : i + 1], s_i, rtol=1e-10, atol=1e-10)

    g_ref = grads(gated, "reference", x, cu_seqlens=cu)
    g_chk = grads(gated, "chunked", x, cu_seqlens=cu, chunk_size=16)
    for name in g_ref:
        assert_rel(g_chk[name], g_ref[name], 1e-9, f"grad {name}")


def test_varlen_empty_document_and_no_initial_state() -> None:
    cu = torch.tensor([0, 10, 10, 33])  # the middle document is empty
    x = make_inputs(1, 33, 1, 4, 4, F64, seed=11, n_state=3)
    for gated in (False, True):
        o_ref, s_ref = run(gated, "reference", x, cu_seqlens=cu, output_final_state=True)
        o, s = run(gated, "chunked", x, cu_seqlens=cu, output_final_state=True, chunk_size=8)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(s, s_ref)
        assert torch.count_nonzero(s[1]) == 0  # zero initial state, nothing written


def test_bad_arguments_raise() -> None:
    x = make_inputs(2, 10, 1, 4, 4, F64)
    with pytest.raises(ValueError, match="batch size must be 1"):
        run(False, "chunked", x, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        run(False, "chunked", x, initial_state=x["s0"][:1])
    with pytest.raises(ValueError, match="impl"):
        run(False, "fast", x)
    with pytest.raises(ValueError, match="chunk_size"):
        run(True, "chunked", x, chunk_size=0)
    one = {n: (y[:1] if n != "s0" else y) for n, y in x.items()}
    with pytest.raises(ValueError, match="cu_seqlens"):
        run(False, "reference", one, cu_seqlens=torch.tensor([0, 4, 9]))


# ---------------------------------------------------------------- dispatch


def test_auto_on_cpu_is_the_chunked_path() -> None:
    x = make_inputs(1, 40, 2, 8, 8, F32, seed=12)
    o_auto, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=16)
    o_chk, _ = gated_delta_rule_chunked(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=16)
    assert torch.equal(o_auto, o_chk)
    o_auto, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"])
    o_ref, _ = delta_rule_reference(x["q"], x["k"], x["v"], x["beta"])
    assert_rel(o_auto, o_ref, 1e-4)
    o_ref, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl="reference")
    o_ref2, _ = gated_delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert torch.equal(o_ref, o_ref2)


def test_public_names_are_callable_after_package_import() -> None:
    # Importing the packages binds the modules as neotron.kernels.<name>, shadowing the lazily
    # exported functions; the modules forward calls so the public spelling still works.
    x = make_inputs(1, 12, 1, 4, 4, F64, seed=15)
    o1, _ = kernels.delta_rule(x["q"], x["k"], x["v"], x["beta"])
    o2, _ = kernels.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl="reference")
    assert torch.equal(o1, delta_rule(x["q"], x["k"], x["v"], x["beta"])[0])
    assert torch.equal(o2, gated_delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"])[0])


def test_bf16_inputs_compute_in_fp32() -> None:
    x = make_inputs(1, 40, 2, 8, 8, F32, seed=13)
    xb = {n: y.detach().bfloat16() for n, y in x.items()}
    xf = {n: y.float() for n, y in xb.items()}  # same values, fp32
    for gated in (False, True):
        ob, sb = run(gated, "chunked", xb, initial_state=xb["s0"], output_final_state=True)
        of, sf = run(gated, "chunked", xf, initial_state=xf["s0"], output_final_state=True)
        assert ob.dtype == torch.bfloat16 and sb.dtype == F32
        torch.testing.assert_close(ob, of.bfloat16())  # only the final rounding differs
        torch.testing.assert_close(sb, sf)


def test_fla_dispatch_passes_arguments_in_fla_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: a stand-in for fla records the call, to pin the argument order (g before beta)
    # and keywords that the real `chunk_gated_delta_rule` / `chunk_delta_rule` take.
    calls: list[tuple] = []

    def fake(*args: torch.Tensor, **kw: object) -> tuple[str, None]:
        calls.append((args, kw))
        return "fla", None

    monkeypatch.setattr(dr_pkg, "_load_fla", lambda module, name: fake)
    x = make_inputs(1, 8, 1, 4, 4, F32)
    cu = torch.tensor([0, 3, 8])
    assert gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl="fla")[0] == "fla"
    args, kw = calls[-1]
    assert args[3] is x["g"] and args[4] is x["beta"]
    assert delta_rule(x["q"], x["k"], x["v"], x["beta"], cu_seqlens=cu, impl="fla")[0] == "fla"
    args, kw = calls[-1]
    assert args[3] is x["beta"] and kw["cu_seqlens"] is cu and kw["scale"] is None
    # "auto" never picks fla for CPU tensors, nor for fp32 (fla's chunk kernels reject fp32).
    assert delta_rule(x["q"], x["k"], x["v"], x["beta"])[0] != "fla"
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_cuda_auto_bf16_matches_chunked_fp32(gated: bool) -> None:
    # On CUDA "auto" is fla's Triton kernel when fla is installed (else the chunked path on GPU);
    # bf16 vs fp32, so a loose relative tolerance as in fla's own tests.
    x = make_inputs(2, 300, 4, 64, 64, F32, seed=14, n_state=2)
    xc = {n: y.detach().cuda() for n, y in x.items()}
    xb = {n: (y.bfloat16() if n in ("q", "k", "v", "beta") else y) for n, y in xc.items()}
    o, s = run(gated, "auto", xb, initial_state=xb["s0"], output_final_state=True)
    o_ref, s_ref = run(gated, "chunked", xc, initial_state=xc["s0"], output_final_state=True)
    assert rel_err(o.float(), o_ref) < 3e-2 and rel_err(s.float(), s_ref) < 3e-2

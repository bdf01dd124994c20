"""DeltaNet, Gated DeltaNet, TTT-Linear and TTT-MLP mixers: decoding step == parallel forward,
document masking == separate documents (outputs and gradients), the short conv, FLOPs,
parameter routing, and the demo configs. The kernels have their own tests (tests/kernels)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import MIXERS, build_model, materialize
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.conv import ShortConv, short_conv
from neotron.arch.deltanet import DeltaNetConfig, GatedDeltaNetConfig
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.ttt import DocLayout, TTTLinearConfig, TTTMLPConfig
from neotron.config import load
from neotron.errors import ConfigError
from neotron.optim.builder import build_optimizer, param_groups
from tests.conftest import ROOT

F64 = torch.float64
DIM = 32
DEMOS = ["deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp", "hybrid"]

# Small shapes: chunk 8 and mini-batch 4 so that a 21-token sequence has a partial last chunk
# / mini-batch, and every option of each mixer on at least once.
CONFIGS = {
    "deltanet": DeltaNetConfig(n_heads=2, chunk_size=8),
    "deltanet_gate_neg_noconv": DeltaNetConfig(
        n_heads=2, chunk_size=8, use_gate=True, allow_neg_eigval=True, conv_size=0, expand_v=1.5
    ),
    "gated_deltanet": GatedDeltaNetConfig(n_heads=2, chunk_size=8),
    "gated_deltanet_neg_nogate": GatedDeltaNetConfig(
        n_heads=4, chunk_size=5, use_gate=False, allow_neg_eigval=True, conv_size=3
    ),
    "ttt_linear": TTTLinearConfig(n_heads=2, mini_batch_size=4),
    "ttt_linear_conv_gate_norope": TTTLinearConfig(
        n_heads=2, mini_batch_size=3, conv_size=4, use_gate=True, rope=False
    ),
    "ttt_mlp": TTTMLPConfig(n_heads=2, mini_batch_size=4),
    "ttt_mlp_conv_gate": TTTMLPConfig(n_heads=4, mini_batch_size=5, conv_size=2, use_gate=True),
}


def make(name: str, dtype=F64, seed: int = 0) -> torch.nn.Module:
    cfg = CONFIGS[name]
    ctx = BuildContext(dim=DIM, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.2)
    layer = MIXERS.build(cfg, ctx)
    torch.manual_seed(seed)
    layer.init_weights()
    with torch.no_grad():  # move every parameter off its init value (gates, norms, offsets)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer.to(dtype)


def plain(T: int) -> SeqInfo:
    return SeqInfo(positions=torch.arange(T))


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_reproduces_parallel_forward(name):
    layer = make(name)
    B, T = 2, 21
    x = torch.randn(B, T, DIM, dtype=F64)
    y = layer(x, plain(T))
    state = layer.init_state(B, dtype=F64)
    for t in range(T):
        y_t, state = layer.step(x[:, t], state)
        torch.testing.assert_close(y_t, y[:, t], rtol=1e-10, atol=1e-11, msg=f"token {t}")


def test_step_state_is_not_a_no_op():
    """Guard for the test above: a fresh state at token 5 gives a different output."""
    layer = make("deltanet")
    x = torch.randn(1, 6, DIM, dtype=F64)
    state = layer.init_state(1, dtype=F64)
    for t in range(5):
        _, state = layer.step(x[:, t], state)
    y_carried, _ = layer.step(x[:, 5], state)
    y_fresh, _ = layer.step(x[:, 5], layer.init_state(1, dtype=F64))
    assert (y_carried - y_fresh).abs().max() > 1e-3


# ----------------------------------------------------------- document masking

# Documents of lengths 1, 2 (shorter than the conv), across chunk / mini-batch boundaries.
DOC_IDS = torch.tensor([
    [0] * 5 + [1] * 9 + [2] * 7,
    [0] * 1 + [1] * 2 + [2] * 1 + [3] * 17,
    [0] * 21,
])


def separate(layer, x: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Every document run on its own, results put back in place."""
    out = torch.zeros(x.shape[:2] + (DIM,), dtype=x.dtype)
    for b in range(x.shape[0]):
        for d in doc_ids[b].unique():
            idx = (doc_ids[b] == d).nonzero().squeeze(1)
            y = layer(x[b : b + 1, idx], plain(len(idx)))[0]
            out = out.index_put((torch.full_like(idx, b), idx), y)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_document_masking_equals_separate_documents(name):
    layer = make(name)
    B, T = DOC_IDS.shape
    x = torch.randn(B, T, DIM, dtype=F64, requires_grad=True)
    # positions restart per document, as SeqInfo.for_tokens makes them
    seq = SeqInfo(positions=torch.arange(T).expand(B, T), doc_ids=DOC_IDS)
    packed = layer(x, seq)
    ref = separate(layer, x, DOC_IDS)
    torch.testing.assert_close(packed, ref, rtol=1e-10, atol=1e-11)
    # the check has teeth: without the mask, information crosses documents
    assert (layer(x, plain(T)) - ref).abs().max() > 1e-4
    gy = torch.randn_like(packed)
    wrt = [x, *layer.parameters()]
    g_packed = torch.autograd.grad(packed, wrt, gy)
    g_ref = torch.autograd.grad(ref, wrt, gy)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for n, a, b in zip(names, g_packed, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=n)


def test_seqinfo_cu_seqlens_from_eos():
    tokens = torch.tensor([[5, 0, 6, 7, 0, 8], [0, 1, 2, 3, 4, 5]])  # eos = 0 ends a document
    seq = SeqInfo.for_tokens(tokens, eos_id=0)
    assert seq.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 12]
    assert SeqInfo.for_tokens(tokens).cu_seqlens is None


def test_ttt_doc_layout_aligns_documents_to_mini_batches():
    seq = SeqInfo(positions=torch.arange(10), doc_ids=torch.tensor([[0] * 3 + [1] * 7,
                                                                     [0] * 10]))
    lay = DocLayout.build(seq.cu_seqlens, 2, 10, 4)
    assert lay.length == 12  # row 0: 3 -> 4, 7 -> 8; row 1: 10 -> 12
    assert lay.dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10] + list(range(12, 22))
    assert list(lay.resets) == [1] and lay.resets[1].tolist() == [True, False]


# --------------------------------------------------------------- short conv


def naive_conv(x, w, doc_ids=None):
    B, T, C = x.shape
    K = w.shape[1]
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for s in range(K):
                src = t - s
                if src >= 0 and (doc_ids is None or doc_ids[b, src] == doc_ids[b, t]):
                    y[b, t] += w[:, K - 1 - s] * x[b, src]
    return F.silu(y)


@pytest.mark.parametrize("K", [2, 4])
def test_short_conv_matches_naive_and_never_crosses_documents(K):
    x = torch.randn(3, 21, 5, dtype=F64, requires_grad=True)
    w = torch.randn(5, K, dtype=F64, requires_grad=True)
    for doc in (None, DOC_IDS):
        y = short_conv(x, w, doc)
        ref = naive_conv(x, w, doc)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        gy = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(ref, (x, w), gy)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_short_conv_step_matches_forward():
    conv = ShortConv(6, 4).double()
    conv.init_weights()
    x = torch.randn(2, 9, 6, dtype=F64)
    y = conv(x)
    state = conv.init_state(2)
    for t in range(9):
        y_t, state = conv.step(x[:, t], state)
        torch.testing.assert_close(y_t, y[:, t], rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp"])
def test_flops_per_token_match_measured(name, monkeypatch):
    """FLOPs counted by FlopCounterMode over forward + backward (with the triangular solve and
    the grouped conv backward counted, tests/test_flops_measured.py) against
    `flops_per_token`, at shapes the demos do not use: d_v = 2 d_k, several chunks and
    mini-batches, a shorter last one. The delta rule's measured work is a little below the
    analytic count (no gradient into the zero initial state or out of the last state)."""
    from tests.test_flops_measured import measure

    cfg = {"deltanet": DeltaNetConfig(n_heads=2),
           "gated_deltanet": GatedDeltaNetConfig(n_heads=2, expand_v=2.0),
           "ttt_linear": TTTLinearConfig(n_heads=2), "ttt_mlp": TTTMLPConfig(n_heads=2)}[name]
    ctx = BuildContext(dim=128, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.02)
    layer = MIXERS.build(cfg, ctx)
    layer.init_weights()
    T = 200
    x = torch.randn(1, T, 128, requires_grad=True)
    measured = measure(lambda: layer(x, plain(T)).sum().backward(), monkeypatch) / T
    assert measured == pytest.approx(layer.flops_per_token(T), rel=0.01)


# ---------------------------------------------------------- params, configs


def test_gated_deltanet_init_and_no_decay_routing():
    cfg = load(ROOT / "configs/demo/gated_deltanet.yaml")
    model = materialize(build_model(cfg.model), "cpu", seed=0)  # meta -> to_empty -> init
    groups = {n: g for g, members in param_groups(model).items() for n, _ in members}
    mixer = model.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.A_log.ndim == 1
    A = mixer.A_log.exp()
    assert ((A > 0) & (A < 16)).all()
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    for i in range(cfg.model.n_layers):
        assert groups[f"layers.{i}.mixer.A_log"] == "no_decay"
        assert groups[f"layers.{i}.mixer.dt_bias"] == "no_decay"
        assert groups[f"layers.{i}.mixer.wq.weight"] == "matrix"
    opt = build_optimizer(model, cfg.optim)
    no_decay = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0
    assert any(p is mixer.A_log for p in no_decay["params"])


def test_ttt_norm_and_bias_routing():
    cfg = load(ROOT / "configs/demo/ttt_mlp.yaml")
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    groups = {n: g for g, members in param_groups(model).items() for n, _ in members}
    for p in ("ttt_norm_weight", "ttt_norm_bias", "b1", "b2", "token_eta_offset"):
        assert groups[f"layers.0.mixer.{p}"] == "no_decay", p
    assert groups["layers.0.mixer.W1"] == "adamw"


def test_config_errors_name_the_key():
    base = ROOT / "configs/demo/deltanet.yaml"
    with pytest.raises(ConfigError, match=r"model\.blocks\.deltanet\.mixer\.n_heads"):
        load(base, ["model.blocks.deltanet.mixer.n_heads=5"])
    with pytest.raises(ConfigError, match=r"mixer\.expand_v"):
        load(base, ["model.blocks.deltanet.mixer.expand_v=0.3"])
    with pytest.raises(ConfigError, match=r"mixer\.conv_sizee"):
        load(base, ["model.blocks.deltanet.mixer.conv_sizee=3"])
    ttt = ROOT / "configs/demo/ttt_linear.yaml"
    with pytest.raises(ConfigError, match=r"mixer\.head_dim"):
        load(ttt, ["model.blocks.ttt_linear.mixer.head_dim=7"])


@pytest.mark.parametrize("name", DEMOS)
def test_demo_config_builds_and_trains_one_step(name):
    cfg = load(ROOT / f"configs/demo/{name}.yaml")
    assert cfg.data.document_masking
    torch.manual_seed(0)
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    opt = build_optimizer(model, cfg.optim)
    T = cfg.data.seq_len
    tokens = torch.randint(1, cfg.model.vocab_size, (2, T + 1))
    tokens[0, 40] = tokens[1, 77] = tokens[1, 100] = 0  # three documents end early
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs, SeqInfo.for_tokens(inputs, eos_id=0))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(cfg.model.vocab_size)) < 1.0  # sane init
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    mixers = {type(layer.mixer).__name__ for layer in model.layers}
    expected = {"deltanet": {"DeltaNet"}, "gated_deltanet": {"GatedDeltaNet"},
                "ttt_linear": {"TTTLinear"}, "ttt_mlp": {"TTTMLP"},
                "hybrid": {"DeltaNet", "Attention"}}[name]
    assert mixers == expected
    assert model.flops_per_token(T) > 6 * model.num_params(exclude_embedding=True) * 0.9


def test_hybrid_pattern_puts_attention_every_fourth_layer():
    cfg = load(ROOT / "configs/demo/hybrid.yaml", ["model.n_layers=8"])
    assert cfg.model.layer_blocks() == ["deltanet", "deltanet", "deltanet", "attention"] * 2


def test_demo_configs_exist():
    for name in DEMOS:
        assert (Path(ROOT) / "configs/demo" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet", "ttt_linear"])
def test_scaling_ladder_matches_llama_in_params_and_tokens(family):
    for rung in ("20m", "60m", "125m", "350m", "760m", "1.3b"):
        llama = load(ROOT / f"configs/scaling/llama/{rung}.yaml")
        cfg = load(ROOT / f"configs/scaling/{family}/{rung}.yaml")
        assert cfg.data.document_masking and not llama.data.document_masking
        assert {b.mixer.type for b in cfg.model.blocks.values()} == {family}
        n, n_llama = build_model(cfg.model).num_params(), build_model(llama.model).num_params()
        assert abs(n - n_llama) / n_llama < 0.01, (rung, n, n_llama)
        for key in ("global_batch_tokens", "steps"):
            assert getattr(cfg.train, key) == getattr(llama.train, key), (rung, key)
        assert cfg.data == llama.data.model_copy(update={"document_masking": True})
        assert (cfg.model.dim, cfg.model.n_layers) == (llama.model.dim, llama.model.n_layers)

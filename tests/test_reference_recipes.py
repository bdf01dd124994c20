"""Reference recipes (issue #9 part 3): with `init: reference` (and the reference's `bias`,
weight decay and shapes), each block reproduces the official construction: parameter shapes
and counts written out from the official code, and the init of every parameter group
(mean, std, range, truncation) within sampling tolerance. The defaults (`init: neotron`)
are checked too, so each difference in the docs' tables is pinned by a test.

Official code read (never imported or copied; constants cited where used):
- short conv / DeltaNet / Gated DeltaNet: fla-org/flash-linear-attention@bc3b101dcb
  (fla/layers/{delta_net,gated_deltanet}.py, fla/models/*/modeling_*.py `_init_weights`);
- product-key memory: facebookresearch/memory@7f85280cee lingua/product_key/memory.py
  (`HashingMemory.__init__`, `reset_parameters`), lingua/optim.py;
- MemoryFormer: C0-Design/MemoryFormer@59686737ec memory_module/memory.py, megatron/model/
  transformer.py, megatron/model/init_functions.py;
- TokenFormer: Haiyang-W/TokenFormer@4d56c73f40 megatron/model/tokenformer.py, configs;
- TTT: test-time-training/ttt-lm-pytorch@cd831db10c ttt.py (`permute_qk`, RoPE).

Statistics are taken over >= 4k samples per group with a fixed seed. Tolerances: the mean
within 6 standard errors (std / sqrt(n)); the std within 6 standard errors of a sample std
(std / sqrt(2 n)), tight enough to tell N(0, s) from its 3-sigma truncation (std 0.987 s)
on the large groups; "untruncated" means some |w| > 3.2 s, which 0.14% of normal samples
are and none of a truncated normal's.
"""

from __future__ import annotations

import math

import pytest
import torch

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.conv import ShortConv
from neotron.arch.deltanet import DeltaNet, DeltaNetConfig, GatedDeltaNet, GatedDeltaNetConfig
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.memory import ProductKeyMemory, ProductKeyMemoryConfig
from neotron.arch.memoryformer import (
    MemoryFormerAttention,
    MemoryFormerAttentionConfig,
    MemoryFormerFFN,
    MemoryFormerFFNConfig,
    MemoryFormerLinear,
    MemoryFormerLinearConfig,
)
from neotron.arch.rope import apply_rope_interleaved, rope_angles
from neotron.arch.tokenformer import Pattention, PattentionConfig
from neotron.arch.ttt import TTTLinear, TTTLinearConfig
from neotron.config import OptimConfig
from neotron.optim.builder import build_optimizer

F64 = torch.float64


def ctx(dim: int, n_layers: int = 4, init_std: float = 0.02) -> BuildContext:
    return BuildContext(dim=dim, layer_idx=0, n_layers=n_layers, linear=DenseLinearConfig(),
                        norm_eps=1e-6, init_std=init_std)


def built(cls, c: BuildContext, cfg, seed: int = 0):
    layer = cls(c, cfg=cfg)
    torch.manual_seed(seed)
    layer.init_weights()
    return layer


def normal(t: torch.Tensor, std: float, *, truncated: bool = False, what: str = "") -> None:
    """t looks like N(0, std^2) samples (truncated at 3 std when `truncated`)."""
    x = t.detach().double().flatten()
    n = x.numel()
    expect = std * (0.98658 if truncated else 1.0)  # std of N(0, s) truncated at +-3 s
    assert abs(x.mean().item()) < 6 * expect / math.sqrt(n), f"{what}: mean {x.mean():.3g}"
    assert abs(x.std().item() / expect - 1) < 6 / math.sqrt(2 * n), (
        f"{what}: std {x.std():.5g}, expected {expect:.5g} (n={n})")
    peak = x.abs().max().item() / std
    if truncated:
        assert peak <= 3 + 1e-6, f"{what}: |w| reaches {peak:.2f} std: not truncated at 3"
    elif n >= 20_000:
        assert peak > 3.2, f"{what}: |w| stays below {peak:.2f} std: truncated?"


def uniform(t: torch.Tensor, bound: float, *, what: str = "") -> None:
    """t looks like U(-bound, bound) samples."""
    x = t.detach().double().flatten()
    n = x.numel()
    assert x.abs().max().item() <= bound * (1 + 1e-6), f"{what}: outside +-{bound}"
    assert x.abs().max().item() > bound * (1 - 20 / n), f"{what}: does not reach the bound"
    std = bound / math.sqrt(3)
    assert abs(x.mean().item()) < 6 * std / math.sqrt(n), f"{what}: mean"
    # var of U: b^2/3; the sample std's relative standard error is sqrt(0.8 / (4 n))
    assert abs(x.std().item() / std - 1) < 6 * math.sqrt(0.2 / n), f"{what}: std {x.std():.4g}"


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


# ----------------------------------------------------------------- short conv


def test_short_conv_init_neotron_uniform_reference_normal():
    conv = ShortConv(8192, 4)
    torch.manual_seed(0)
    conv.init_weights()
    uniform(conv.weight, 1 / math.sqrt(4), what="neotron conv")  # nn.Conv1d's default
    conv.init_weights(0.02)
    normal(conv.weight, 0.02, what="fla conv")  # fla's _init_weights on nn.Conv1d


# ------------------------------------------------------ DeltaNet / Gated DeltaNet


def fla_gdn_shapes(hidden: int, num_heads: int, head_dim: int, expand_v: float,
                   conv_size: int = 4) -> dict[str, tuple[int, ...]]:
    """fla/layers/gated_deltanet.py's parameters (use_gate, short conv), fla's names."""
    key_dim, head_v = num_heads * head_dim, int(head_dim * expand_v)
    value_dim = num_heads * head_v
    return {
        "q_proj.weight": (key_dim, hidden), "k_proj.weight": (key_dim, hidden),
        "v_proj.weight": (value_dim, hidden), "a_proj.weight": (num_heads, hidden),
        "b_proj.weight": (num_heads, hidden), "A_log": (num_heads,), "dt_bias": (num_heads,),
        "q_conv1d.weight": (key_dim, 1, conv_size), "k_conv1d.weight": (key_dim, 1, conv_size),
        "v_conv1d.weight": (value_dim, 1, conv_size), "g_proj.weight": (value_dim, hidden),
        "o_norm.weight": (head_v,), "o_proj.weight": (hidden, value_dim),
    }


# neotron name -> fla name (ShortConv keeps [C, K]: fla's nn.Conv1d has [C, 1, K])
GDN_NAMES = {"wq.weight": "q_proj.weight", "wk.weight": "k_proj.weight",
             "wv.weight": "v_proj.weight", "wa.weight": "a_proj.weight",
             "wb.weight": "b_proj.weight", "A_log": "A_log", "dt_bias": "dt_bias",
             "q_conv.weight": "q_conv1d.weight", "k_conv.weight": "k_conv1d.weight",
             "v_conv.weight": "v_conv1d.weight", "wg.weight": "g_proj.weight",
             "o_norm.weight": "o_norm.weight", "wo.weight": "o_proj.weight"}


def test_gated_deltanet_reference_shape_matches_fla_and_its_state_size():
    """The paper / fla shape at dim 1024: head_dim 256, expand_v 2, heads * head_dim = 0.75
    dim (3 heads); parameter for parameter the same shapes as fla's layer. Its state is
    384 dim numbers per layer, 6x the ladders' head_dim-64 state (dim * head_dim)."""
    dim = 1024
    cfg = GatedDeltaNetConfig(n_heads=3, head_dim=256, expand_v=2, init="reference")
    assert cfg.check(dim) == []
    layer = GatedDeltaNet(ctx(dim), cfg=cfg)
    ours = {GDN_NAMES[n]: s for n, s in shapes(layer).items()}
    ref = fla_gdn_shapes(dim, 3, 256, 2.0)
    assert ours.keys() == ref.keys()
    for name, s in ref.items():
        assert math.prod(ours[name]) == math.prod(s) and ours[name][0] == s[0], name
    assert sum(math.prod(s) for s in ours.values()) == sum(math.prod(s) for s in ref.values())
    state = layer.init_state(1, device="meta")["S"].numel()
    assert state == 3 * 256 * 512 == 384 * dim
    ladder = GatedDeltaNet(ctx(dim), cfg=GatedDeltaNetConfig(n_heads=16))  # 350m rung: 16 x 64
    assert state / ladder.init_state(1, device="meta")["S"].numel() == 6


@pytest.mark.parametrize("cls,cfg_cls", [(DeltaNet, DeltaNetConfig),
                                         (GatedDeltaNet, GatedDeltaNetConfig)])
def test_deltanet_reference_init_is_fla(cls, cfg_cls):
    """fla re-initializes every nn.Linear (o_proj included: prenorm_residual_strategy is None)
    and every ShortConvolution to N(0, 0.02), untruncated; A_log / dt_bias as Mamba2."""
    dim, L = 512, 6
    layer = built(cls, ctx(dim, L), cfg_cls(n_heads=4, use_gate=True, init="reference"))
    for name in ("wq", "wk", "wv", "wg", "wo"):
        normal(getattr(layer, name).weight, 0.02, what=name)
    normal(torch.cat([layer.wb.weight.flatten(), *([layer.wa.weight.flatten()]
                                                    if layer.gated else [])]), 0.02, what="b/a")
    normal(torch.cat([c.weight.flatten() for c in layer._convs()]), 0.02, what="convs")
    assert torch.equal(layer.o_norm.weight, torch.ones(layer.dv))
    if layer.gated:
        A = layer.A_log.exp()
        assert ((A > 0) & (A <= 16)).all()
        dt = torch.nn.functional.softplus(layer.dt_bias)
        assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    # the neotron default: truncated, W_o depth-scaled, convs N(0, 0.02) as fla's (measured)
    ours = built(cls, ctx(dim, L), cfg_cls(n_heads=4, use_gate=True))
    normal(ours.wq.weight, 0.02, truncated=True, what="neotron wq")
    normal(ours.wo.weight, 0.02 / math.sqrt(2 * L), truncated=True, what="neotron wo")
    normal(torch.cat([c.weight.flatten() for c in ours._convs()]), 0.02, what="neotron convs")
    # conv_init: uniform, the default before issue #9: nn.Conv1d's U(+-1/sqrt(K))
    old = built(cls, ctx(dim, L), cfg_cls(n_heads=4, use_gate=True, conv_init="uniform"))
    uniform(torch.cat([c.weight.flatten() for c in old._convs()]), 0.5, what="uniform convs")


# ------------------------------------------------------------ product-key memory


def pk_official_params(dim, heads, n_keys, k_dim, v_dim, *, gated=False) -> int:
    """HashingMemory with swilu_projection (Meta's Memory+), mem_query_bias, nn.Linear biases."""
    keys = 2 * heads * n_keys * (k_dim // 2)
    values = n_keys**2 * v_dim
    query = dim * heads * k_dim + heads * k_dim
    value_proj = v_dim * dim + dim
    swilu = dim * v_dim + v_dim
    gating = dim + 1 if gated else 0
    return keys + values + query + value_proj + swilu + gating


def test_product_key_memory_reference_is_metas_construction():
    dim, heads, n_keys, k_dim = 256, 4, 64, 128
    cfg = ProductKeyMemoryConfig(n_keys=n_keys, heads=heads, knn=8, k_dim=k_dim, gated=True,
                                 init="reference", bias=True)
    layer = built(ProductKeyMemory, ctx(dim), cfg)
    assert sum(p.numel() for p in layer.parameters()) == pk_official_params(
        dim, heads, n_keys, k_dim, dim, gated=True)
    assert layer.ws.bias is not None and layer.wo.bias is not None and layer.gate.bias is not None
    # query: xavier_uniform_, bound sqrt(6 / (fan_in + fan_out))
    uniform(layer.query.weight, math.sqrt(6 / (dim + heads * k_dim)), what="query")
    uniform(layer.keys, 1 / math.sqrt(k_dim), what="keys")  # U(+-1/sqrt(k_dim))
    normal(layer.values, dim**-0.5, what="values")  # N(0, v_dim^-1/2)
    normal(layer.ws.weight, dim**-0.5, what="W_s")  # N(0, output_dim^-1/2)
    normal(layer.wo.weight, dim**-0.5, what="W_o")
    normal(layer.gate.weight, dim**-0.5, what="gate")  # N(0, input_dim^-1/2), 256 samples
    for b in (layer.query.bias, layer.ws.bias, layer.wo.bias, layer.gate.bias):
        assert torch.equal(b, torch.zeros_like(b))  # not reset by Meta: zero here
    # the default: no biases on W_s / W_o / gate, truncated N(0, init_std), W_o depth-scaled
    ours = built(ProductKeyMemory, ctx(dim), cfg.model_copy(update={"init": "neotron",
                                                                     "bias": False}))
    assert ours.ws.bias is None and ours.wo.bias is None and ours.gate.bias is None
    assert sum(p.numel() for p in ours.parameters()) == pk_official_params(
        dim, heads, n_keys, k_dim, dim, gated=True) - (dim + dim + 1)
    normal(ours.query.weight, 0.02, truncated=True, what="neotron query")
    normal(ours.wo.weight, 0.02 / math.sqrt(8), truncated=True, what="neotron W_o")


MEMORY_MODEL = {
    "vocab_size": 64, "dim": 32, "n_layers": 3, "tie_embeddings": True,
    "blocks": {
        "attention": {"mixer": {"type": "attention", "n_heads": 4}, "ffn": {"type": "swiglu"}},
        "memory": {"mixer": {"type": "attention", "n_heads": 4},
                   "ffn": {"type": "memory", "n_keys": 8, "heads": 2, "knn": 2, "k_dim": 8,
                           "share_values": True}},
    },
    "block_at": {"memory": [0, 2]},
}


def test_memory_values_weight_decay_option():
    """value_weight_decay: 0.1 (lingua: AdamW's weight_decay on every parameter) puts the
    (shared) value table in its own group with that decay; the default keeps it at 0."""
    opt_cfg = OptimConfig(lr=1e-3, weight_decay=0.1, sparse_lr=1e-2)

    def groups(**ffn):
        spec = {**MEMORY_MODEL, "blocks": {**MEMORY_MODEL["blocks"], "memory": {
            **MEMORY_MODEL["blocks"]["memory"],
            "ffn": {**MEMORY_MODEL["blocks"]["memory"]["ffn"], **ffn}}}}
        model = materialize(build_model(ModelConfig.model_validate(spec)), "cpu", 0)
        opt = build_optimizer(model, opt_cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        return {g["name"]: (g["weight_decay"], g["lr"], sorted(names[id(p)] for p in g["params"]))
                for g in opt.param_groups}

    default = groups()
    assert default["sparse"] == (0.0, 1e-2, ["layers.0.ffn.values"])
    decayed = groups(value_weight_decay=0.1)
    assert "sparse" not in decayed
    assert decayed["sparse_wd0.1"] == (0.1, 1e-2, ["layers.0.ffn.values"])
    assert {k: v for k, v in decayed.items() if k != "sparse_wd0.1"} == {
        k: v for k, v in default.items() if k != "sparse"}


# ------------------------------------------------------------------- MemoryFormer


def test_memoryformer_attention_reference_init_is_neox_small_init():
    dim, tau = 256, 8
    cfg = MemoryFormerAttentionConfig(n_heads=4, tau=tau, init="reference")
    layer = built(MemoryFormerAttention, ctx(dim), cfg)
    K = dim // tau
    for name in ("wq", "wk", "wv"):  # MemoryLayer(hidden d, output d): tables [K 2^tau, d] + bias
        m = getattr(layer, name)
        assert m.tables.numel() == K * 2**tau * dim and m.bias.shape == (dim,)
        normal(m.tables, math.sqrt(2 / (5 * dim)), what=f"{name} tables")  # small_init
    normal(torch.cat([layer.wq.bias, layer.wk.bias, layer.wv.bias]), 0.001, what="qkv bias")
    assert sum(p.numel() for p in layer.parameters()) == 3 * (K * 2**tau * dim + dim)
    ours = built(MemoryFormerAttention, ctx(dim), cfg.model_copy(update={"init": "neotron"}))
    normal(ours.wq.tables, 0.02, truncated=True, what="neotron q")
    normal(ours.wv.tables, 0.02 / math.sqrt(8), truncated=True, what="neotron v")
    assert torch.equal(ours.wq.bias, torch.zeros(dim))


def test_memoryformer_ffn_reference_is_the_official_memory_block():
    """MemoryBlock with mlp_expand_type extra_bit (2): MemoryLayer(d -> K (tau+2)), LayerNorm,
    MemoryLayer(K (tau+2) -> d) hashing chunks of tau+2 bits; tables 0.02 randn, biases
    0.001 randn."""
    dim, tau, extra = 128, 8, 2
    K = dim // tau
    hidden = K * (tau + extra)
    layer = built(MemoryFormerFFN, ctx(dim), MemoryFormerFFNConfig(tau=tau, init="reference"))
    official = (K * 2**tau * hidden + hidden) + 2 * hidden + (
        (hidden // (tau + extra)) * 2 ** (tau + extra) * dim + dim)
    assert sum(p.numel() for p in layer.parameters()) == official
    normal(layer.up.tables, 0.02, what="up tables")
    normal(layer.down.tables, 0.02, what="down tables")
    normal(torch.cat([layer.up.bias, layer.down.bias]), 0.001, what="biases")
    assert torch.equal(layer.norm.weight, torch.ones(hidden))
    assert torch.equal(layer.norm.bias, torch.zeros(hidden))
    # a bare memory layer (model.linear: memoryformer) with init reference: MemoryLayer's own
    lin = MemoryFormerLinear(64, 512, cfg=MemoryFormerLinearConfig(init="reference"))
    torch.manual_seed(0)
    lin.init_weights(0.5)  # the block's std is not used by the reference init
    normal(lin.tables, 0.02, what="bare tables")
    normal(lin.bias, 0.001, what="bare bias")


def test_memoryformer_block_is_pre_norm_like_the_official_layer():
    """ParallelTransformerLayer.forward: h = x + attn(LN1(x)); out = h + mlp(LN2(h))."""
    spec = {"vocab_size": 32, "dim": 32, "n_layers": 1, "blocks": {"mf": {
        "mixer": {"type": "memoryformer", "n_heads": 2, "tau": 4},
        "ffn": {"type": "memoryformer", "tau": 4}}}}
    block = materialize(build_model(ModelConfig.model_validate(spec)), "cpu", 0).layers[0].double()
    x = torch.randn(2, 5, 32, dtype=F64)
    seq = SeqInfo.for_tokens(torch.zeros(2, 5, dtype=torch.long))
    h = x + block.mixer(block.mixer_norm(x), seq)
    torch.testing.assert_close(block(x, seq), h + block.ffn(block.ffn_norm(h), seq))


# --------------------------------------------------------------------- TokenFormer


def tokenformer_model(init: str, dim=256, n_layers=4):
    spec = {"vocab_size": 64, "dim": dim, "n_layers": n_layers, "tie_embeddings": True,
            "linear": {"type": "pattention", "n_tokens": dim, "init": init},
            "blocks": {"tf": {"mixer": {"type": "attention", "n_heads": 4},
                              "ffn": {"type": "pattention", "n_tokens": 4 * dim, "init": init}}}}
    return materialize(build_model(ModelConfig.model_validate(spec)), "cpu", 0)


def test_tokenformer_reference_is_normal_keys_and_wang_values():
    """Pattention(key init_method normal 0.02, value output_layer_init_method wang_init) for
    q, k, v, proj and the FFN (150M config: qkv/proj slots = d, ffn slots = 4 d)."""
    dim, L = 256, 4
    model = tokenformer_model("reference", dim, L)
    wang = 2 / L / math.sqrt(dim)
    keys, values = [], []
    for layer in model.layers:
        pats = [layer.mixer.wq, layer.mixer.wk, layer.mixer.wv, layer.mixer.wo,
                layer.ffn.pattention]
        assert [tuple(p.keys.shape) for p in pats] == [(dim, dim)] * 4 + [(4 * dim, dim)]
        assert [tuple(p.values.shape) for p in pats] == [(dim, dim)] * 4 + [(4 * dim, dim)]
        assert all(p.bias is None for p in pats)
        keys += [p.keys.flatten() for p in pats]
        values += [p.values.flatten() for p in pats]
        normal(layer.mixer.wq.values, wang, what="q values")  # q/k/v values: wang too
        normal(layer.mixer.wo.keys, 0.02, what="proj keys")
    normal(torch.cat(keys), 0.02, what="keys")
    normal(torch.cat(values), wang, what="values")
    # official count per layer: 4 (2 d^2) + 2 (4 d) d, plus two non-parametric LayerNorms
    block_params = sum(p.numel() for n, p in model.layers[0].named_parameters() if "norm" not in n)
    assert block_params == 4 * 2 * dim * dim + 2 * 4 * dim * dim


def test_tokenformer_neotron_default_init():
    dim, L = 256, 4
    model = tokenformer_model("neotron", dim, L)
    out_std = 0.02 / math.sqrt(2 * L)
    for layer in model.layers:
        normal(layer.mixer.wq.keys, 0.02, truncated=True, what="q keys")
        normal(layer.mixer.wq.values, 0.02, truncated=True, what="q values")
        normal(layer.mixer.wo.values, out_std, truncated=True, what="proj values")
        # every key at init_std, the attention output's too (depth-scaled before issue #9)
        normal(layer.mixer.wo.keys, 0.02, truncated=True, what="proj keys")
        normal(layer.ffn.pattention.keys, 0.02, truncated=True, what="ffn keys")
        normal(layer.ffn.pattention.values, out_std, truncated=True, what="ffn values")


def test_pattention_reference_needs_the_model_shape():
    p = Pattention(8, 8, cfg=PattentionConfig(init="reference"))
    with pytest.raises(ValueError, match="n_layers and dim"):
        p.init_weights(0.02)


# ---------------------------------------------------------------------------- TTT


def official_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """ttt-lm-pytorch's RoPE written independently: adjacent pairs (x_2i, x_2i+1) as complex
    numbers, rotated by pos * theta^(-2i/d). x: [B, T, H, d]."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=F64) / d)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=F64), pos.double()[:, None] * freq)
    return torch.view_as_real(z * rot[None, :, None, :]).flatten(-2)


def test_interleaved_rope_is_the_official_rotation():
    x = torch.randn(2, 16, 3, 8, dtype=F64)
    pos = torch.arange(16) % 16
    cos, sin = rope_angles(pos, 8, 10000.0)
    got = apply_rope_interleaved(x, cos.double(), sin.double())
    torch.testing.assert_close(got, official_rope(x, pos, 10000.0), rtol=1e-6, atol=1e-6)


def test_ttt_interleaved_pairs_are_a_permutation_of_rotate_half():
    """rope_pairs: interleaved with official (interleaved-layout) weights computes what
    rope_pairs: half computes with every per-head feature permuted (evens first, then odds):
    a reparameterization, which is why official weights need the interleaved option."""
    dim, H, d = 32, 4, 8
    c = BuildContext(dim=dim, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                     norm_eps=1e-6, init_std=0.3)
    inter = built(TTTLinear, c, TTTLinearConfig(n_heads=H, mini_batch_size=4,
                                                rope_pairs="interleaved")).double()
    half = TTTLinear(c, cfg=TTTLinearConfig(n_heads=H, mini_batch_size=4)).double()
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # within a head
    full = (torch.arange(H)[:, None] * d + perm).flatten()  # across heads
    sd = inter.state_dict()
    with torch.no_grad():
        for name in ("wq", "wk", "wv"):
            getattr(half, name).weight.copy_(sd[f"{name}.weight"][full])
        half.wo.weight.copy_(sd["wo.weight"][:, full])
        half.wlr.load_state_dict(inter.wlr.state_dict())
        half.W0.copy_(sd["W0"][:, perm][:, :, perm])
        half.b0.copy_(sd["b0"][..., perm])
        half.ttt_norm_weight.copy_(sd["ttt_norm_weight"][:, perm])
        half.ttt_norm_bias.copy_(sd["ttt_norm_bias"][:, perm])
        half.token_eta_offset.copy_(sd["token_eta_offset"])
        half.post_norm.weight.copy_(sd["post_norm.weight"][full])
        half.post_norm.bias.copy_(sd["post_norm.bias"][full])
    x = torch.randn(2, 12, dim, dtype=F64)
    seq = SeqInfo.for_tokens(torch.zeros(2, 12, dtype=torch.long))
    torch.testing.assert_close(half(x, seq), inter(x, seq), rtol=1e-10, atol=1e-10)
    plain = TTTLinear(c, cfg=TTTLinearConfig(n_heads=H, mini_batch_size=4)).double()
    plain.load_state_dict(inter.state_dict())  # same weights, other layout: another function
    assert not torch.allclose(plain(x, seq), inter(x, seq), atol=1e-6)


def test_ttt_linear_reference_init_and_parameter_count():
    """ttt-lm-pytorch TTTLinear (Transformer backbone, no gate / conv): q, k, v, o nn.Linear
    N(0, 0.02) (o not depth-scaled), the lr gate [H, width, 1] N(0, 0.02) and bias 0, W1
    N(0, 0.02), b1 0, ttt_norm 1 / 0, learnable_token_idx 0, post_norm LayerNorm(width)."""
    dim, H, b = 256, 4, 16
    d = dim // H
    layer = built(TTTLinear, ctx(dim, 6), TTTLinearConfig(n_heads=H, mini_batch_size=b,
                                                          init="reference"))
    official = 4 * dim * H * d + (H * dim + H) + 2 * H * d + (H * d * d + H * d) + b + 2 * dim
    assert sum(p.numel() for p in layer.parameters()) == official
    normal(torch.cat([getattr(layer, n).weight.flatten() for n in ("wq", "wk", "wv", "wo")]),
           0.02, what="q/k/v/o")
    normal(layer.wo.weight, 0.02, what="o")  # not depth-scaled
    normal(layer.wlr.weight, 0.02, what="lr gate")
    normal(layer.W0, 0.02, what="W1")
    for t in (layer.wlr.bias, layer.b0, layer.ttt_norm_bias, layer.token_eta_offset):
        assert torch.equal(t, torch.zeros_like(t))
    assert torch.equal(layer.ttt_norm_weight, torch.ones(H, d))
    ours = built(TTTLinear, ctx(dim, 6), TTTLinearConfig(n_heads=H, mini_batch_size=b))
    normal(ours.wo.weight, 0.02 / math.sqrt(12), truncated=True, what="neotron o")

"""MemoryFormer layers: the linear against its formula, the block's structure, FLOPs and
parameters against a dense layer of the same shape, routing of the tables."""

from __future__ import annotations

import pytest
import torch

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinear, DenseLinearConfig, make_linear
from neotron.arch.memoryformer import (
    MemoryFormerAttention,
    MemoryFormerFFN,
    MemoryFormerLinear,
    MemoryFormerLinearConfig,
)
from neotron.config import validate
from neotron.errors import ConfigError
from neotron.kernels.hash_lookup import hash_codes, hash_lookup_reference
from neotron.optim.routing import param_groups

F64 = torch.float64


def away_from_zero(shape, seed=0):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (z.sign() * (z.abs() + 0.1)).requires_grad_()


def mf_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2,
                blocks={"mf": {"mixer": {"type": "memoryformer", "n_heads": 4, "tau": 4},
                               "ffn": {"type": "memoryformer", "tau": 4}}})
    base.update(kw)
    return ModelConfig.model_validate(base)


@pytest.mark.parametrize("score", ["l1", "paper"])
def test_linear_is_hash_lookup_plus_bias(score):
    cfg = MemoryFormerLinearConfig(tau=4, score=score)
    layer = make_linear(12, 5, cfg).to(F64)
    assert isinstance(layer, MemoryFormerLinear) and layer.tables.shape == (3, 16, 5)
    torch.manual_seed(0)
    layer.init_weights(0.5)
    with torch.no_grad():
        layer.bias.normal_()
    x = away_from_zero((2, 7, 12))
    y = layer(x)
    ref = hash_lookup_reference(x.reshape(-1, 12), layer.tables, score) + layer.bias
    torch.testing.assert_close(y, ref.view(2, 7, 5), rtol=1e-12, atol=1e-12)
    # the reference impl of the layer gives the same values and gradients
    ref_layer = make_linear(12, 5, cfg.model_copy(update={"impl": "reference"})).to(F64)
    ref_layer.load_state_dict(layer.state_dict())
    y2 = ref_layer(x)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, [x, layer.tables, layer.bias], g)
    gb = torch.autograd.grad(y2, [x, ref_layer.tables, ref_layer.bias], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_tables_get_sparse_row_gradients():
    layer = make_linear(16, 8, MemoryFormerLinearConfig(tau=8)).to(F64)
    layer.init_weights(0.02)
    x = away_from_zero((5, 16))
    layer(x).sum().backward()
    codes = hash_codes(x.detach().view(5, 2, 8))
    read = torch.zeros(2, 256, dtype=torch.bool)
    read[torch.arange(2).expand(5, 2), codes] = True
    nonzero = layer.tables.grad.abs().sum(-1) > 0
    assert torch.equal(nonzero, read)  # exactly the rows read, nothing else
    assert read.sum() <= 10


def test_flops_are_about_one_tau_th_of_dense_and_params_2_to_tau_over_tau():
    d = 512
    for tau in (4, 8):
        mem = make_linear(d, d, MemoryFormerLinearConfig(tau=tau, bias=False))
        dense = DenseLinear(d, d, cfg=DenseLinearConfig())
        ratio = mem.flops_per_token(2048) / dense.flops_per_token(2048)
        assert 1 / tau <= ratio <= 1.1 / tau, (tau, ratio)
        n_mem = sum(p.numel() for p in mem.parameters())
        assert n_mem == (2**tau // tau) * dense.weight.numel()


def test_block_structure_no_output_projection_and_extra_bits():
    ctx = BuildContext(dim=32, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.02)
    cfg = mf_model_cfg()
    attn = MemoryFormerAttention(ctx, cfg=cfg.blocks["mf"].mixer)
    assert isinstance(attn.wo, torch.nn.Identity)
    assert all(isinstance(m, MemoryFormerLinear) for m in (attn.wq, attn.wk, attn.wv))
    ffn = MemoryFormerFFN(ctx, cfg=cfg.blocks["mf"].ffn)
    K = 32 // 4
    assert ffn.up.tables.shape == (K, 2**4, K * (4 + 2))
    assert ffn.down.tables.shape == (K, 2**(4 + 2), 32)  # tau + 2 bits per chunk
    attn.init_weights()
    ffn.init_weights()
    x = torch.randn(2, 9, 32)
    seq = SeqInfo(positions=torch.arange(9))
    assert attn(x, seq).shape == x.shape and ffn(x, seq).shape == x.shape


def test_model_trains_and_routes_tables_as_sparse():
    cfg = mf_model_cfg()
    model = materialize(build_model(cfg), "cpu", seed=0)
    groups = param_groups(model)
    sparse = {n for n, _ in groups["sparse"]}
    assert sparse == {f"layers.{i}.{m}.tables" for i in range(2)
                      for m in ("mixer.wq", "mixer.wk", "mixer.wv", "ffn.up", "ffn.down")}
    tokens = torch.randint(0, 61, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_block_flops_well_below_a_dense_block():
    T = 128
    mf = build_model(mf_model_cfg(dim=256, blocks={"mf": {
        "mixer": {"type": "memoryformer", "n_heads": 4}, "ffn": {"type": "memoryformer"}}}))
    dense = build_model(mf_model_cfg(dim=256, blocks={"d": {
        "mixer": {"type": "attention", "n_heads": 4}, "ffn": {"type": "swiglu"}}}))
    attn_core = 3 * 2 * 2 * 256 * (T + 1) / 2  # QK^T and AV, the same in both
    mf_proj = mf.layers[0].flops_per_token(T) - attn_core
    dense_proj = dense.layers[0].flops_per_token(T) - attn_core
    assert mf_proj < dense_proj / 4


def test_config_errors_name_the_key():
    base = {"run_dir": "x", "model": {"vocab_size": 61, "dim": 36, "n_layers": 1, "blocks": {
        "mf": {"mixer": {"type": "memoryformer", "n_heads": 6, "tau": 8},
               "ffn": {"type": "swiglu"}}}}}
    with pytest.raises(ConfigError, match="blocks.mf.mixer.tau: model.dim=36 is not divisible"):
        validate(base)
    base["model"]["dim"] = 32
    base["model"]["blocks"]["mf"]["mixer"] = {"type": "memoryformer", "n_heads": 4,
                                              "n_kv_heads": 2}
    with pytest.raises(ConfigError, match="n_kv_heads"):
        validate(base)



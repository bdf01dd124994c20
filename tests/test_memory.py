"""Product-key memory: exact product-key top-k against brute force over all n^2 keys, the
layer against its formula, value sharing, placement, FLOPs, sparse-table clipping, and
FSDP2 training of a model with all three parameter-memory layers on 2 gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.memory import (
    ProductKeyMemory,
    ProductKeyMemoryConfig,
    brute_force_topk,
    clip_sparse_grads_,
    dense_params,
    product_key_topk,
    shared_param_groups,
    sparse_params,
)
from neotron.config import validate
from neotron.errors import ConfigError

F64 = torch.float64


def ctx(dim=24, linear=None) -> BuildContext:
    return BuildContext(dim=dim, layer_idx=0, n_layers=2, linear=linear or DenseLinearConfig(),
                        norm_eps=1e-5, init_std=0.2)


def pkm(dtype=F64, **kw) -> ProductKeyMemory:
    cfg = ProductKeyMemoryConfig(**{"n_keys": 7, "heads": 2, "knn": 3, "k_dim": 8, **kw})
    layer = ProductKeyMemory(ctx(), cfg=cfg)
    torch.manual_seed(0)
    layer.init_weights()
    return layer.to(dtype)


@pytest.mark.parametrize("n,knn", [(8, 1), (8, 4), (33, 5), (6, 6)])
def test_product_key_topk_equals_brute_force(n, knn):
    gen = torch.Generator().manual_seed(n * 100 + knn)
    s1 = torch.randn(5, 3, n, generator=gen, dtype=F64)
    s2 = torch.randn(5, 3, n + 1, generator=gen, dtype=F64)  # halves may differ in size
    scores, slots = product_key_topk(s1, s2, knn)
    ref_scores, ref_slots = brute_force_topk(s1, s2, knn)
    assert torch.equal(slots, ref_slots)
    assert torch.equal(scores, ref_scores)


def test_layer_lookup_is_top_k_over_all_n_squared_keys():
    """Against the n^2 full keys [K1_i ; K2_j] scored one by one."""
    layer = pkm(n_keys=9, knn=4)
    x = torch.randn(11, 24, dtype=F64)
    slots, w = layer.lookup(x)
    q = layer.query(x).view(11, 2, 8)
    n = 9
    for h in range(2):
        k1, k2 = layer.keys[h, 0], layer.keys[h, 1]
        full = torch.cat([k1.repeat_interleave(n, 0), k2.repeat(n, 1)], dim=1)  # [n^2, k_dim]
        scores = q[:, h] @ full.T
        top, idx = scores.topk(4, dim=-1)
        assert torch.equal(slots[:, h], idx)
        torch.testing.assert_close(w[:, h], top.softmax(-1), rtol=1e-12, atol=1e-12)


def reference_forward(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The formula with the brute-force top-k and torch's embedding_bag."""
    N = x.shape[0]
    q = layer.query(x).view(N, layer.heads, 2, layer.k_dim // 2)
    s1 = torch.einsum("nhd,hmd->nhm", q[:, :, 0], layer.keys[:, 0])
    s2 = torch.einsum("nhd,hmd->nhm", q[:, :, 1], layer.keys[:, 1])
    scores, slots = brute_force_topk(s1, s2, layer.knn)
    w = scores.softmax(-1)
    m = F.embedding_bag(slots.reshape(N, -1), layer.values, per_sample_weights=w.reshape(N, -1),
                        mode="sum")
    out = layer.wo(m * F.silu(layer.ws(x))) if layer.ws is not None else m
    if layer.gate is not None:
        out = out * torch.sigmoid(layer.gate(x))
    return out


@pytest.mark.parametrize("kw", [{}, {"gated": True}, {"swilu": False, "v_dim": 24},
                                {"impl": "reference"}])
def test_layer_matches_formula_forward_and_backward(kw):
    layer = pkm(**kw)
    x = torch.randn(2, 5, 24, dtype=F64, requires_grad=True)
    seq = SeqInfo(positions=torch.arange(5))
    out = layer(x, seq)
    ref = reference_forward(layer, x.view(10, 24)).view(2, 5, 24)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [x, layer.values, layer.keys, *layer.query.parameters()]
    ga = torch.autograd.grad(out.square().sum(), params)
    gb = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parallel_ffn_adds_a_swiglu():
    layer = pkm(parallel_ffn={"type": "swiglu", "hidden_dim": 16})
    x = torch.randn(1, 4, 24, dtype=F64)
    seq = SeqInfo(positions=torch.arange(4))
    mem_only = reference_forward(layer, x.view(4, 24)).view(1, 4, 24)
    torch.testing.assert_close(layer(x, seq), mem_only + layer.ffn(x, seq))


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=4, blocks={
        "dense": {"mixer": {"type": "attention", "n_heads": 4}, "ffn": {"type": "swiglu"}},
        "memory": {"mixer": {"type": "attention", "n_heads": 4},
                   "ffn": {"type": "memory", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8,
                           "share_values": True}}},
        block_at={"memory": [1, 3]})
    base.update(kw)
    return ModelConfig.model_validate(base)


def test_placement_by_layer_index():
    cfg = model_cfg()
    assert cfg.layer_blocks() == ["dense", "memory", "dense", "memory"]
    model = build_model(cfg)
    assert [type(layer.ffn).__name__ for layer in model.layers] == [
        "SwiGLU", "ProductKeyMemory", "SwiGLU", "ProductKeyMemory"]
    bad = {"run_dir": "x", "model": cfg.model_dump(mode="json")}
    bad["model"]["block_at"] = {"memory": [4]}
    with pytest.raises(ConfigError, match=r"block_at.memory: layer 4 is not in \[0, 4\)"):
        validate(bad)
    bad["model"]["block_at"] = {"memroy": [1]}
    with pytest.raises(ConfigError, match="unknown block 'memroy'"):
        validate(bad)


def test_shared_values_are_one_parameter_trained_by_both_layers(tmp_path):
    from neotron.train.checkpoint import Checkpointer

    model = materialize(build_model(model_cfg()), "cpu", seed=0)
    v1, v3 = model.layers[1].ffn.values, model.layers[3].ffn.values
    assert v1 is v3
    assert [n for n, _ in model.named_parameters() if n.endswith("ffn.values")] == [
        "layers.1.ffn.values"]
    other = materialize(build_model(model_cfg()), "cpu", seed=0)
    assert other.layers[1].ffn.values is not v1  # sharing never crosses models
    unshared = build_model(model_cfg(blocks={**model_cfg().model_dump()["blocks"], "memory": {
        "mixer": {"type": "attention", "n_heads": 4},
        "ffn": {"type": "memory", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8}}}))
    assert unshared.layers[1].ffn.values is not unshared.layers[3].ffn.values

    tokens = torch.randint(0, 64, (2, 9))
    model(tokens).square().mean().backward()
    grad_both = v1.grad.clone()
    model.zero_grad()
    # layer 3's part alone: detach layer 1's read by running it with a frozen copy
    with torch.no_grad():
        frozen = v1.detach().clone()
    model.layers[1].ffn.values = torch.nn.Parameter(frozen, requires_grad=False)
    model(tokens).square().mean().backward()
    assert 0 < v1.grad.abs().sum() < grad_both.abs().sum() + 1e-12
    model.layers[1].ffn.values = v1
    model.zero_grad(set_to_none=True)

    # a DCP checkpoint round trip keeps the values (and the tie)
    ck = Checkpointer(tmp_path / "ck", keep_last=1)
    opt = torch.optim.AdamW(model.parameters())
    ck.save(1, model, opt, {"tokens": 0})
    fresh = materialize(build_model(model_cfg()), "cpu", seed=1)
    ck.load(ck.latest(), fresh, torch.optim.AdamW(fresh.parameters()), restore_rng=False)
    assert fresh.layers[1].ffn.values is fresh.layers[3].ffn.values
    torch.testing.assert_close(fresh.layers[3].ffn.values, v1.detach())
    torch.testing.assert_close(fresh(tokens), model(tokens))


def test_flops_count_reads_not_slots(monkeypatch):
    """Measured (FlopCounterMode, the embedding bag counted as tests/test_flops_measured.py
    does): the count matches, grows with the keys scored, never with the n^2 slots."""
    from tests.test_flops_measured import measure

    def flops(n):
        layer = ProductKeyMemory(ctx(dim=64), cfg=ProductKeyMemoryConfig(
            n_keys=n, heads=2, knn=8, k_dim=32, gated=True))
        layer.to_empty(device="cpu")
        layer.init_weights()
        x = torch.randn(10, 64, requires_grad=True)
        seq = SeqInfo(positions=torch.arange(10))
        measured = measure(lambda: layer(x, seq).sum().backward(), monkeypatch) / 10
        assert measured == pytest.approx(layer.flops_per_token(10), rel=1e-9)
        return measured

    assert flops(256) - flops(64) == pytest.approx(3 * 2 * 2 * 32 * (256 - 64))  # the keys
    assert flops(256) < 2 * 256**2 * 64 / 10  # a tenth of reading every slot once


def test_clip_sparse_grads_clips_tables_apart():
    cfg = model_cfg(blocks={
        "dense": {"mixer": {"type": "memoryformer", "n_heads": 4, "tau": 4},
                  "ffn": {"type": "swiglu"}},
        "memory": {"mixer": {"type": "attention", "n_heads": 4},
                   "ffn": {"type": "memory", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8,
                           "value_grad_clip": 1e-3}}})
    model = materialize(build_model(cfg), "cpu", seed=0)
    (model(torch.randint(0, 64, (2, 9))).square().mean() * 100).backward()
    sparse = sparse_params(model)
    values = [p for p in sparse if p.ndim == 2]
    tables = [p for p in sparse if p.ndim == 3]
    assert len(values) == 2 and len(tables) == 2 * 3  # 2 value tables, q/k/v x 2 layers
    dense = dense_params(model)
    assert not {id(p) for p in dense} & {id(p) for p in sparse}
    assert len(dense) + len(sparse) == len(list(model.parameters()))
    before = {id(p): p.grad.clone() for p in model.parameters()}

    def norm(ps, grads=None):
        return torch.sqrt(sum((grads or {}).get(id(p), p.grad).double().square().sum() for p in ps))

    total = clip_sparse_grads_(model, default_max_norm=1e-2)
    assert total == pytest.approx(norm(sparse, before).item(), rel=1e-6)
    assert norm(values).item() == pytest.approx(1e-3, rel=1e-4)  # their own limit
    assert norm(tables).item() == pytest.approx(1e-2, rel=1e-4)  # the default limit
    for p in dense:
        assert torch.equal(p.grad, before[id(p)])


# ---------------------------------------------------------------- FSDP2 on 2 gloo processes


FSDP_CFG = dict(vocab_size=64, dim=32, n_layers=2, linear={"type": "pattention", "n_tokens": 16},
                blocks={"a": {"mixer": {"type": "memoryformer", "n_heads": 4, "tau": 4},
                              "ffn": {"type": "memory", "n_keys": 8, "heads": 2, "knn": 4,
                                      "k_dim": 8}},
                        "b": {"mixer": {"type": "attention", "n_heads": 4},
                              "ffn": {"type": "memoryformer", "tau": 4}}},
                pattern=["a", "b"])
STEPS, BATCH = 3, 4


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, 13), generator=gen) for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    losses = []
    for batch in batches:
        mine = batch.chunk(world)[rank]
        logits = model(mine[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        loss.backward()
        clip_sparse_grads_(model, default_max_norm=0.5)
        torch.nn.utils.clip_grad_norm_(dense_params(model), 1.0, foreach=False)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _shard(model, world):
    """The trainer's own FSDP2 wrapping (blocks sharing a table become one FSDP unit)."""
    from torch.distributed.device_mesh import init_device_mesh

    from neotron.train.parallel import MESH_DIMS, DistEnv, ParallelDims, apply_fsdp

    dims = ParallelDims(dp_replicate=1, dp_shard=world, tp=1)
    mesh = init_device_mesh("cpu", dims.shape, mesh_dim_names=MESH_DIMS)
    apply_fsdp(model, DistEnv(world_size=world, dims=dims, mesh=mesh))


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for name, cfg in (("three_layers", FSDP_CFG), ("shared_values", model_cfg())):
            model = materialize(build_model(ModelConfig.model_validate(cfg)), "cpu", seed=0)
            _shard(model, world)
            losses = torch.stack(_train(model, _batches(), rank, world))
            dist.all_reduce(losses)
            params = {n: p.full_tensor() for n, p in model.named_parameters()}
            results[name] = {"losses": losses / world, "params": params}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "rank0.pt"
    mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2,
                       start_method="spawn")
    results = torch.load(out)
    for case, cfg in (("three_layers", FSDP_CFG), ("shared_values", model_cfg())):
        got = results[case]
        model = materialize(build_model(ModelConfig.model_validate(cfg)), "cpu", seed=0)
        losses = torch.stack(_train(model, _batches()))
        torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-4, atol=1e-5,
                                       msg=f"{case}: {name}")


def test_shared_param_groups():
    model = build_model(model_cfg(n_layers=6, block_at={"memory": [1, 3, 4]}))
    assert shared_param_groups(list(model.layers)) == [[1, 3, 4]]
    assert shared_param_groups(list(build_model(ModelConfig.model_validate(FSDP_CFG)).layers)) == []


def test_bf16_parameters_and_autocast_run():
    """FSDP2's mixed precision casts parameters to bf16; CUDA runs without FSDP use autocast."""
    x = torch.randint(0, 64, (2, 9))
    for cfg in (ModelConfig.model_validate(FSDP_CFG), model_cfg()):
        model = materialize(build_model(cfg), "cpu", seed=0).to(torch.bfloat16)
        model(x).float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16
                   for p in model.parameters())
        model = materialize(build_model(cfg), "cpu", seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in model.parameters())

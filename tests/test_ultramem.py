"""UltraMemV2 (`ffn: {type: ultramem}`), each part against an oracle written here, in fp64:

- TDQKR: the exact rescoring stage equals scoring all n^2 (row, col) pairs with the full
  Tucker cores, restricted to the pre-selected rows and columns (candidates from this file's
  own rank-1 factors, via eigh, not the SVD the layer uses); and what the pre-selection
  guarantees: with a rank-1 core and non-negative factors it is the exhaustive top-k.
- The whole layer (implicit value expansion + PEER-style value processing) against a plain
  reference that materializes the virtual table (n^2 rows of expand * v_dim) and scores all
  pairs: forward and gradients of every parameter and of the input. Shapes: one head and the
  default two cores; two heads with expand=2, GELU and an offset window that wraps around the
  pool; one core without pre-values; candidates > knn.
- The permutation: a fixed function of (perm_seed, layer), whatever the global RNG; not saved.
- The shared pool, the init recipe's statistics, routing (4x value lr, weight decay, clipping),
  config errors, FLOPs, and FSDP2 on 2 gloo processes against one process.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.accounting import param_counts
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.memory import clip_sparse_grads_, dense_params, sparse_params
from neotron.arch.ultramem import UltraMem, UltraMemConfig, tdqkr
from neotron.config import OptimConfig, validate
from neotron.errors import ConfigError
from neotron.optim.builder import build_optimizer

F64 = torch.float64


# ------------------------------------------------------------------ oracle helpers


def oracle_rank1(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular pair of one r x r core via eigh of M M^T (not the SVD), oriented so
    that sum(u) + sum(v) >= 0."""
    _, vecs = torch.linalg.eigh(core @ core.T)
    u = vecs[:, -1]
    v = core.T @ u
    v = v / v.norm()
    if u.sum() + v.sum() < 0:
        u, v = -u, -v
    return u, v


def oracle_tdqkr(s_row, s_col, cores, cand, knn):
    """All n^2 pairs scored with the full cores, masked to the candidate rows x columns, top-k.
    s_row, s_col [N, H, n, r]; cores [C, H, r, r] -> (per-core [N, H, knn, C], slots)."""
    N, H, n, _ = s_row.shape
    per_core, slots = [], []
    for h in range(H):
        u, v = oracle_rank1(cores[:, h].sum(0).detach())
        rows = (s_row[:, h] @ u).topk(cand, -1).indices  # [N, cand]
        cols = (s_col[:, h] @ v).topk(cand, -1).indices
        grid = torch.stack([s_row[:, h] @ cores[c, h] @ s_col[:, h].transpose(1, 2)
                            for c in range(cores.shape[0])], -1)  # [N, n, n, C]
        allowed = torch.zeros(N, n, n, dtype=torch.bool)
        for t in range(N):
            allowed[t, rows[t][:, None], cols[t][None, :]] = True
        total = grid.sum(-1).masked_fill(~allowed, -math.inf).flatten(1)
        best = total.topk(knn, -1).indices  # flat index of [n, n]: i * n + j
        per_core.append(grid.flatten(1, 2).gather(1, best[..., None].expand(-1, -1, grid.shape[-1])))
        slots.append(best)
    return torch.stack(per_core, 1), torch.stack(slots, 1)


def components(N=6, H=2, n=9, r=2, C=2, seed=0, nonneg=False):
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(N, H, n, r, generator=gen, dtype=F64)
    s_col = torch.randn(N, H, n, r, generator=gen, dtype=F64)
    cores = torch.rand(C, H, r, r, generator=gen, dtype=F64)
    if nonneg:
        s_row, s_col = s_row.abs(), s_col.abs()
    return s_row, s_col, cores


# ------------------------------------------------------------------------ TDQKR


@pytest.mark.parametrize("n,r,C,cand,knn", [
    (9, 2, 2, 4, 5),     # the default rank and cores
    (12, 3, 1, 5, 25),   # knn = cand^2: every candidate pair is read
    (7, 2, 3, 7, 3),     # cand = n: the whole grid is rescored (end-to-end exhaustive)
    (10, 1, 2, 3, 1),    # rank 1, a single read
])
def test_exact_rescoring_equals_exhaustive_scoring_on_the_candidates(n, r, C, cand, knn):
    s_row, s_col, cores = components(n=n, r=r, C=C, seed=n * 10 + r)
    got_scores, got_slots = tdqkr(s_row, s_col, cores, cand, knn)
    ref_scores, ref_slots = oracle_tdqkr(s_row, s_col, cores, cand, knn)
    assert torch.equal(got_slots, ref_slots)
    torch.testing.assert_close(got_scores, ref_scores, rtol=1e-12, atol=1e-12)
    # and the scores are differentiable in the components and cores like the oracle's
    params = [s_row.requires_grad_(), s_col.requires_grad_(), cores.requires_grad_()]
    ga = torch.autograd.grad(tdqkr(*params, cand, knn)[0].square().sum(), params)
    gb = torch.autograd.grad(oracle_tdqkr(*params, cand, knn)[0].square().sum(), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_pre_selection_is_exhaustive_for_a_rank_one_core_and_non_negative_factors():
    """What the rank-1 pre-selection guarantees: if sum_c C_c = sigma u v^T and the factors
    S_row . u, S_col . v are >= 0, the score is monotone in each factor, so the top-k pairs
    over all n^2 have their rows and columns among the top-k of each side."""
    s_row, s_col, _ = components(N=8, H=2, n=11, r=3, nonneg=True, seed=3)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 3, 1, generator=gen, dtype=F64), torch.rand(2, 1, 3, generator=gen,
                                                                        dtype=F64)
    cores = torch.stack([0.7 * a @ b, 0.3 * a @ b])  # [C=2, H=2, 3, 3], sum is rank 1
    knn = 6
    got_scores, got_slots = tdqkr(s_row, s_col, cores, knn, knn)
    full = torch.einsum("thir,chrs,thjs->thij", s_row, cores, s_col).flatten(2)
    top, idx = full.topk(knn, -1)
    assert torch.equal(got_slots, idx)
    torch.testing.assert_close(got_scores.sum(-1), top, rtol=1e-12, atol=1e-12)


def test_rank1_factors_are_the_leading_singular_pair_with_one_orientation():
    from neotron.arch.ultramem import rank1_factors

    _, _, cores = components(H=5, r=3, C=2, seed=7)
    cores = cores - 0.5  # mixed signs
    u, v = rank1_factors(cores)
    for h in range(5):
        M = cores[:, h].sum(0)
        ou, ov = oracle_rank1(M)
        torch.testing.assert_close(u[h], ou, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(v[h], ov, rtol=1e-10, atol=1e-10)
        assert (u[h] @ M @ v[h]).item() == pytest.approx(torch.linalg.svdvals(M)[0].item())
    assert not rank1_factors(cores.requires_grad_())[0].requires_grad


# ------------------------------------------------------------- the layer vs a reference


def ctx(dim=24, layer_idx=0, n_layers=2) -> BuildContext:
    return BuildContext(dim=dim, layer_idx=layer_idx, n_layers=n_layers,
                        linear=DenseLinearConfig(), norm_eps=1e-5, init_std=0.2)


def layer_of(layer_idx=0, n_layers=2, dim=24, **kw) -> UltraMem:
    cfg = UltraMemConfig(**{"n_keys": 6, "knn": 4, "k_dim": 8, "v_dim": 12, "pre_dim": 10,
                            "parallel_ffn": {"type": "swiglu", "hidden_dim": 16}, **kw})
    layer = UltraMem(ctx(dim, layer_idx, n_layers), cfg=cfg)
    torch.manual_seed(0)
    layer.init_weights()
    layer = layer.to(F64)
    with torch.no_grad():  # values large enough that every term of the gradient matters
        layer.values.normal_()
        if layer.pre_values is not None:
            layer.pre_values.normal_()
    return layer


def reference_layer(layer: UltraMem, x: torch.Tensor, *, pool: int, offset: int) -> torch.Tensor:
    """The layer's math written out: own LayerNorm, all-pairs TDQKR oracle, and the virtual
    table of n^2 rows materialized from the pool through the permutation."""
    cfg = layer.cfg
    N, H, k, n = x.shape[0], cfg.heads, cfg.k_dim, cfg.n_keys
    E, C, v = cfg.expand, cfg.tucker_cores, layer.values.shape[1]
    window = n * n // E

    def ln(t, w):
        mu = t.mean(-1, keepdim=True)
        var = (t - mu).square().mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * w

    q = ln((x @ layer.query.weight.T).view(N, H, 2, k), layer.q_norm)
    keys = ln(layer.keys, layer.k_norm)  # [H, 2, n, r, k]
    s_row = torch.einsum("thk,hnrk->thnr", q[:, :, 0], keys[:, 0])
    s_col = torch.einsum("thk,hnrk->thnr", q[:, :, 1], keys[:, 1])
    per_core, slots = oracle_tdqkr(s_row, s_col, layer.cores, layer.cand, cfg.knn)

    # Virtual slot s reads pool row ((perm[s] % W) + offset) % P into block perm[s] // W.
    virt_v, virt_p = [], []
    for s in range(n * n):
        sigma = int(layer.perm[s])
        row, group = (sigma % window + offset) % pool, sigma // window
        block = [torch.zeros(v, dtype=F64)] * E
        block[group] = layer.values[row]
        virt_v.append(torch.cat(block))
        if layer.pre_values is not None:
            virt_p.append(layer.pre_values[row])
    virt_v = torch.stack(virt_v)  # [n^2, E * v]

    m = torch.zeros(N, E * v, dtype=F64)
    for t in range(N):
        for h in range(H):
            for j in range(cfg.knn):
                g = int(slots[t, h, j])
                w = per_core[t, h, j].repeat_interleave(v // C).repeat(E)  # chunk c <- s_c
                if virt_p:
                    p = virt_p[g] @ (layer.pre.weight @ x[t])
                    w = w * (F.gelu(p) if cfg.pre_gelu else p)
                m[t] = m[t] + w * virt_v[g]
    out = m @ layer.wo.weight.T
    f = layer.ffn
    return out + (F.silu(x @ f.w1.weight.T) * (x @ f.w3.weight.T)) @ f.w2.weight.T


CASES = {
    "defaults": dict(kw={}, layer_idx=0, n_layers=2, pool=72, offset=0),
    # window 18 of a pool of 36; layer 3 of 4: offset 27, the window wraps past row 35
    "two_heads_expand_gelu_wrap": dict(kw={"heads": 2, "expand": 2, "pre_gelu": True},
                                       layer_idx=3, n_layers=4, pool=36, offset=27),
    "one_core_no_pre_values": dict(kw={"tucker_cores": 1, "pre_dim": 0, "share_ratio": 0.25},
                                   layer_idx=1, n_layers=3, pool=144, offset=48),
    "more_candidates_than_reads": dict(kw={"candidates": 5, "knn": 3, "tucker_rank": 3},
                                       layer_idx=1, n_layers=2, pool=72, offset=36),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_reference_forward_and_backward(case):
    spec = CASES[case]
    layer = layer_of(spec["layer_idx"], spec["n_layers"], **spec["kw"])
    assert layer.values.shape[0] == spec["pool"]
    x = torch.randn(2, 4, 24, dtype=F64, requires_grad=True)
    out = layer(x, SeqInfo(positions=torch.arange(4)))
    ref = reference_layer(layer, x.view(8, 24), pool=spec["pool"], offset=spec["offset"])
    torch.testing.assert_close(out.view(8, 24), ref, rtol=1e-10, atol=1e-12)
    params = [x] + [p for p in layer.parameters()]
    ga = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    gb = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, ga, gb):
        assert a is not None and b is not None, name
        assert b.abs().sum() > 0, name  # every parameter is exercised
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_memory_only_layer_without_parallel_ffn():
    layer = layer_of(parallel_ffn=None)
    assert layer.ffn is None
    x = torch.randn(1, 3, 24, dtype=F64)
    full = layer_of()
    missing = layer.load_state_dict(full.state_dict(), strict=False).unexpected_keys
    assert sorted(missing) == ["ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight"]
    seq = SeqInfo(positions=torch.arange(3))
    torch.testing.assert_close(layer(x, seq), full(x, seq) - full.ffn(x, seq))


# ------------------------------------------------------------ permutation, pool, init


def model_cfg(**ffn) -> ModelConfig:
    return ModelConfig.model_validate(dict(
        vocab_size=64, dim=32, n_layers=3, blocks={"u": {
            "mixer": {"type": "attention", "n_heads": 4},
            "ffn": {"type": "ultramem", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8,
                    "parallel_ffn": {"type": "swiglu", "hidden_dim": 32}, **ffn}}}))


def test_permutation_is_fixed_per_layer_whatever_the_global_rng():
    torch.manual_seed(123)
    a = materialize(build_model(model_cfg()), "cpu", seed=0)
    torch.rand(1000)
    b = materialize(build_model(model_cfg()), "cpu", seed=7)  # other weights, same perms
    perms = [layer.ffn.perm for layer in a.layers]
    for pa, layer in zip(perms, b.layers):
        assert torch.equal(pa, layer.ffn.perm)
        assert torch.equal(pa.sort().values, torch.arange(64))  # a permutation
    assert not torch.equal(perms[0], perms[1])  # each layer its own
    other = materialize(build_model(model_cfg(perm_seed=1)), "cpu", seed=0)
    assert not torch.equal(other.layers[0].ffn.perm, perms[0])
    assert not any(k.endswith("perm") for k in a.state_dict())  # rebuilt, never saved


def test_pool_is_shared_by_all_layers_with_offsets(tmp_path):
    from neotron.train.checkpoint import Checkpointer

    model = materialize(build_model(model_cfg()), "cpu", seed=0)
    ffns = [layer.ffn for layer in model.layers]
    assert all(f.values is ffns[0].values and f.pre_values is ffns[0].pre_values for f in ffns)
    assert ffns[0].values.shape == (128, 32)  # window 64 / share_ratio 0.5
    assert [f.offset for f in ffns] == [0, 42, 85]  # layer * 128 // 3
    names = [n for n, _ in model.named_parameters() if "values" in n]
    assert names == ["layers.0.ffn.values", "layers.0.ffn.pre_values"]
    unshared = materialize(build_model(model_cfg(share_values=False)), "cpu", seed=0)
    assert unshared.layers[0].ffn.values is not unshared.layers[1].ffn.values
    assert unshared.layers[1].ffn.values.shape == (64, 32)
    assert unshared.layers[1].ffn.offset == 0

    tokens = torch.randint(0, 64, (2, 9))
    ck = Checkpointer(tmp_path / "ck", keep_last=1)
    ck.save(1, model, torch.optim.AdamW(model.parameters()), {"tokens": 0})
    fresh = materialize(build_model(model_cfg()), "cpu", seed=1)
    ck.load(ck.latest(), fresh, torch.optim.AdamW(fresh.parameters()), restore_rng=False)
    assert fresh.layers[2].ffn.values is fresh.layers[0].ffn.values
    torch.testing.assert_close(fresh(tokens), model(tokens))


def test_init_statistics_match_the_recipe():
    dim, k, v, E = 256, 64, 128, 2
    layer = UltraMem(ctx(dim), cfg=UltraMemConfig(n_keys=64, k_dim=k, v_dim=v, pre_dim=96,
                                                  expand=E, heads=2, tucker_rank=4))
    torch.manual_seed(0)
    layer.init_weights()

    def stats(t):
        return t.mean().item(), t.std().item()

    assert torch.all(layer.q_norm == k**-0.4) and torch.all(layer.k_norm == k**-0.4)
    for t, std in ((layer.query.weight, k**-0.5), (layer.keys, k**-0.5),
                   (layer.wo.weight, (E * v) ** -0.5), (layer.pre.weight, dim**-0.5),
                   (layer.values, 0.02), (layer.pre_values, 0.02)):
        mean, s = stats(t)
        assert abs(mean) < 4 * std / math.sqrt(t.numel())
        assert s == pytest.approx(std, rel=0.03)
        # a plain normal, not truncated: about 0.27% of draws lie beyond 3 std
        assert 0.001 < (t.abs() > 3 * std).float().mean().item() < 0.006
    cores = layer.cores
    assert cores.min() >= 0 and cores.max() <= 1
    assert stats(cores)[0] == pytest.approx(0.5, abs=0.1)
    other = UltraMem(ctx(dim), cfg=UltraMemConfig(n_keys=8, k_dim=k, init="neotron"))
    other.init_weights()
    assert torch.all(other.q_norm == 1.0) and other.keys.abs().max() <= k**-0.5


# --------------------------------------------------- optimizer routing and clipping


def test_values_get_4x_lr_and_their_own_clip_and_decay_by_choice():
    model = materialize(build_model(model_cfg()), "cpu", seed=0)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3))
    groups = {g["name"]: g for g in opt.param_groups}
    pool = {id(model.layers[0].ffn.values), id(model.layers[0].ffn.pre_values)}
    assert {id(p) for p in groups["sparse_lr4x"]["params"]} == pool
    assert groups["sparse_lr4x"]["base_lr"] == pytest.approx(4e-3)
    assert groups["sparse_lr4x"]["weight_decay"] == 0.0
    assert "sparse" not in groups
    # default value_grad_clip None: the pool is clipped with the dense parameters (release)
    assert sparse_params(model) == []
    assert pool <= {id(p) for p in dense_params(model)}

    model = materialize(build_model(model_cfg(value_lr_scale=2.5, value_grad_clip=1e-3,
                                              value_weight_decay=0.1)), "cpu", seed=0)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, sparse_lr=1e-2))
    g = {g["name"]: g for g in opt.param_groups}["sparse_wd0.1_lr2.5x"]
    assert g["base_lr"] == pytest.approx(2.5e-2) and g["weight_decay"] == 0.1
    assert {id(p) for p in sparse_params(model)} == {id(p) for p in g["params"]}
    model(torch.randint(0, 64, (2, 9))).square().mean().mul(100).backward()
    clip_sparse_grads_(model, default_max_norm=1.0)
    norm = torch.sqrt(sum(p.grad.square().sum() for p in sparse_params(model)))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)


def test_config_errors_name_the_key():
    base = {"run_dir": "x", "model": model_cfg().model_dump(mode="json")}
    for change, match in (({"knn": 80, "candidates": 4}, r"ffn.knn: knn=80 exceeds the 4\^2"),
                          ({"candidates": 9}, "ffn.candidates: 9 candidates per side exceed"),
                          ({"knn": 9}, "ffn.knn: 9 candidates .* n_keys=8 .candidates defaults"),
                          ({"expand": 3}, "ffn.expand: .* not divisible by expand=3"),
                          ({"tucker_cores": 3}, "ffn.tucker_cores: v_dim=32 is not divisible")):
        bad = {**base, "model": {**base["model"]}}
        bad["model"]["blocks"] = {"u": {**base["model"]["blocks"]["u"]}}
        bad["model"]["blocks"]["u"]["ffn"] = {**base["model"]["blocks"]["u"]["ffn"], **change}
        with pytest.raises(ConfigError, match=match):
            validate(bad)


def test_flops_are_linear_in_keys_and_independent_of_the_pool(monkeypatch):
    from tests.test_flops_measured import measure

    def layer(**kw):
        cfg = {"n_keys": 64, "heads": 2, "knn": 16, "k_dim": 64, "parallel_ffn": None, **kw}
        return UltraMem(ctx(dim=256), cfg=UltraMemConfig(**cfg))

    def measured(m):  # FlopCounterMode, forward + backward, pool reads counted
        m.init_weights()
        x = torch.randn(6, 256, requires_grad=True)
        seq = SeqInfo(positions=torch.arange(6))
        return measure(lambda: m(x, seq).sum().backward(), monkeypatch) / 6

    for m in (layer(), layer(n_keys=128)):
        assert measured(m) == pytest.approx(m.flops_per_token(6), rel=1e-9)
    # the pool's size (share_ratio) changes parameters, never FLOPs
    assert layer(share_ratio=0.1).flops_per_token(2048) == layer().flops_per_token(2048)
    assert layer(share_ratio=0.1).values.numel() > layer().values.numel()
    # reads: heads * knn rows of v + pre_dim per token, far below the n^2 slots
    small = layer()
    assert sum(small.active_params().values()) == 2 * 16 * 512
    model = build_model(model_cfg())
    pool = model.layers[0].ffn.values.numel() + model.layers[0].ffn.pre_values.numel()
    reads = 3 * 2 * 4 * (32 + 32)
    assert param_counts(model).active == sum(p.numel() for p in model.parameters()) - pool + reads


# -------------------------------------------------------------- FSDP2, 2 gloo processes


STEPS, BATCH = 3, 4
FSDP_CASES = {"shared_pool": {}, "own_pools_expand2": {"share_values": False, "expand": 2,
                                                        "pre_gelu": True, "value_grad_clip": 0.5}}


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, 13), generator=gen) for _ in range(STEPS)]


def _train(model, rank=0, world=1):
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    losses = []
    for batch in _batches():
        mine = batch.chunk(world)[rank]
        logits = model(mine[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        loss.backward()
        clip_sparse_grads_(model, default_max_norm=1.0)
        torch.nn.utils.clip_grad_norm_(dense_params(model), 1.0, foreach=False)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


# The same 2-process harness as tests/test_memory.py's (kept apart so each file's cases and
# training loop stay readable on their own).
def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from tests.test_memory import _shard  # the trainer's FSDP2 wrapping, as test_memory uses it

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for case, kw in FSDP_CASES.items():
            model = materialize(build_model(model_cfg(**kw)), "cpu", seed=0)
            _shard(model, world)
            losses = _train(model, rank, world)
            dist.all_reduce(losses)
            params = {n: p.full_tensor() for n, p in model.named_parameters()}
            results[case] = {"losses": losses / world, "params": params}
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
    for case, kw in FSDP_CASES.items():
        model = materialize(build_model(model_cfg(**kw)), "cpu", seed=0)
        losses = _train(model)
        torch.testing.assert_close(results[case]["losses"], losses, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(results[case]["params"][name], p.detach(), rtol=1e-4,
                                       atol=1e-5, msg=f"{case}: {name}")


def test_bf16_parameters_and_autocast_run():
    x = torch.randint(0, 64, (2, 9))
    model = materialize(build_model(model_cfg()), "cpu", seed=0).to(torch.bfloat16)
    model(x).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    model = materialize(build_model(model_cfg()), "cpu", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("rung", ["20m", "60m", "125m", "350m", "760m", "1.3b"])
def test_scaling_ladder_matches_llama(rung):
    """Each ultramem rung has the Llama rung's training FLOPs and activated parameters (1%),
    data and steps; built on the meta device (no memory)."""
    from neotron.config import load
    from tests.conftest import ROOT

    um = load(ROOT / "configs" / "scaling" / "ultramem" / f"{rung}.yaml")
    ll = load(ROOT / "configs" / "scaling" / "llama" / f"{rung}.yaml")
    a, b = build_model(um.model), build_model(ll.model)
    fa, fb = a.flops_per_token(um.data.seq_len), b.flops_per_token(ll.data.seq_len)
    assert 0.99 * fb <= fa <= fb
    assert param_counts(a).active == pytest.approx(sum(p.numel() for p in b.parameters()), rel=0.01)
    assert um.data == ll.data and um.train == ll.train and um.optim.lr == ll.optim.lr
    assert all(type(layer.ffn).__name__ == "UltraMem" for layer in a.layers)


def test_tensor_parallel_refuses_what_has_no_plan():
    """tp plans exist for ultramem (tests/test_tp_memory.py); value expansion E > 1 has none:
    a clear error at config validation, naming the key."""
    from neotron.arch.tp_plans import tp_config_errors

    assert dict(tp_config_errors(model_cfg(), 2)) == {}
    errors = dict(tp_config_errors(model_cfg(expand=2), 2))
    assert any("expand=2 has no tensor-parallel plan" in m for m in errors.values()), errors


def test_value_lr_ramp_groups_the_pool_and_ramps_4_to_1():
    model = materialize(build_model(model_cfg(value_lr_decay_fraction=0.5)), "cpu", seed=0)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3))
    groups = {g["name"]: g for g in opt.param_groups}
    pool = {id(model.layers[0].ffn.values), id(model.layers[0].ffn.pre_values)}
    assert {id(p) for p in groups["sparse_lr4to1x"]["params"]} == pool
    assert groups["sparse_lr4to1x"]["base_lr"] == pytest.approx(4e-3)
    assert tuple(groups["sparse_lr4to1x"]["lr_ramp"]) == (4.0, 1.0, 0.5)


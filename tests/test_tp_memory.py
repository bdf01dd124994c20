"""Tensor parallelism for the memory layers: `memory` and `ultramem` (the value table sharded
along the value dimension, retrieval replicated), TokenFormer's Pattention (parameter tokens
split) and MemoryFormer (hash tables split by output columns or by hash group); plans in
neotron/arch/tp_plans.py, docs/distributed.md.

Two gloo processes run the trainer's own `setup_env` + `parallelize` with `parallel.tp=2` and
save what they computed; this process builds the same models from the same seed *without* any
parallel code and compares, in fp32:
- logits, loss and the gradient of every parameter (DTensor gradients gathered), then the
  losses of 3 AdamW steps (the trainer's sparse-table and global clipping) and the final
  parameters; cases: product-key Memory+ with a shared table, a gate and a parallel SwiGLU;
  plain PKM (no W_o: the read is all-gathered); UltraMem with the shared pool and pre-values
  (C = 2 cores = tp); one core (tp > C), GELU, own pools and own clipping; four cores
  (tp < C) without pre-values; TokenFormer with Pattention q, k, v, w_o (column / row
  layouts) and FFN (tokens split), with each of the three norms; MemoryFormer (both scores;
  after a step the hash codes may legitimately differ, so its later losses are compared
  loosely and its parameters not); memory and UltraMem also with dp_shard=2 x tp=2 (4
  processes);
- the virtual-slot permutation of every UltraMem layer, gathered from both ranks;
- the collectives of one memory layer's forward and backward (a recording dispatch mode, and
  torch's CommDebugMode for the counts): exactly one all-reduce of [tokens, dim] after W_o
  (plus UltraMem's [tokens, heads * knn] pre-value scores) forward, the expected all-reduces
  of activation gradients backward, and no all-gather, nor any collective the size of the
  table.
Config checks (shapes that tp must divide) run in this process. The workers are forked from
this process (imports done once): the whole file takes about a minute on 2 busy cores.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TP = 2
STEPS = 3
COMMON = [
    "run_dir=/tmp/neotron-unused", "data.tokenizer.vocab_size=512", "model.vocab_size=512",
    "model.dim=32", "model.n_layers=4", "data.seq_len=16", "train.global_batch_tokens=128",
    "train.micro_batch_size=8", "optim.lr=1e-2", "optim.sparse_lr=2e-2",
    "optim.schedule.warmup_steps=0",
]
MEMORY = ["model.blocks.attention.mixer.n_heads=4", "model.blocks.attention.mixer.n_kv_heads=2",
          "model.blocks.memory.mixer.n_heads=4", "model.blocks.memory.mixer.n_kv_heads=2",
          "model.blocks.memory.ffn.n_keys=8", "model.blocks.memory.ffn.heads=2",
          "model.blocks.memory.ffn.knn=4", "model.blocks.memory.ffn.k_dim=16"]
ULTRA = ["model.blocks.ultramem.mixer.n_heads=4", "model.blocks.ultramem.mixer.n_kv_heads=2",
         "model.blocks.ultramem.ffn.n_keys=8", "model.blocks.ultramem.ffn.knn=4",
         "model.blocks.ultramem.ffn.k_dim=8", "model.blocks.ultramem.ffn.v_dim=16",
         "model.blocks.ultramem.ffn.pre_dim=16",
         "model.blocks.ultramem.ffn.parallel_ffn.hidden_dim=64"]
TOKEN = ["model.blocks.tokenformer.mixer.n_heads=4", "model.linear.n_tokens=16",
         "model.blocks.tokenformer.ffn.n_tokens=64"]
MF = ["model.blocks.memoryformer.mixer.n_heads=4", "model.blocks.memoryformer.mixer.tau=4",
      "model.blocks.memoryformer.ffn.tau=4"]
M, U = "model.blocks.memory.ffn.", "model.blocks.ultramem.ffn."
T = "model.blocks.tokenformer."
CASES = {
    "memory_shared_gated_ffn": ("memory", [f"{M}gated=true", f"{M}parallel_ffn.type=swiglu",
                                           f"{M}parallel_ffn.hidden_dim=64", f"{M}bias=true"]),
    "memory_plain_pkm": ("memory", [f"{M}swilu=false", f"{M}share_values=false"]),
    "ultramem_shared_pool": ("ultramem", []),
    "ultramem_one_core_gelu_own": ("ultramem", [f"{U}tucker_cores=1", f"{U}pre_gelu=true",
                                                f"{U}share_values=false",
                                                f"{U}value_grad_clip=0.5"]),
    "ultramem_four_cores_no_pre": ("ultramem", [f"{U}tucker_cores=4", f"{U}pre_dim=0",
                                                f"{U}share_ratio=1.0"]),
    # Pattention everywhere: q, k, v, w_o (column / row layouts) and the FFN (tokens split)
    "tokenformer": ("tokenformer", []),
    "tokenformer_softmax_ffn": ("tokenformer", [f"{T}ffn.norm=softmax",
                                                "model.linear.norm=gelu_l2_norm"]),
    # hash tables: q, k, v column-parallel; the FFN's up column-, down row-parallel by group
    "memoryformer": ("memoryformer", []),
    "memoryformer_paper_score": ("memoryformer", ["model.blocks.memoryformer.mixer.score=paper",
                                                  "model.blocks.memoryformer.ffn.score=paper"]),
}
CHECKPOINTED = ("memory_shared_gated_ffn", "ultramem_shared_pool")
SHAPES = {"memory": MEMORY, "ultramem": ULTRA, "tokenformer": TOKEN, "memoryformer": MF}


def case_cfg(case: str, *extra: str):
    from neotron.config import load

    kind, overrides = CASES[case]
    return load(ROOT / "configs" / "demo" / f"{kind}.yaml",
                [*COMMON, *SHAPES[kind], *overrides, *extra])


def batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (8, 17), generator=g) for _ in range(STEPS)]


def loss_of(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x[:, :-1])
    return logits, F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def train(model, cfg, env=None, optimizer: list | None = None) -> tuple[dict, torch.Tensor]:
    """Step 1's logits (this data-parallel rank's rows) and gradients, and STEPS AdamW steps'
    losses (the mean over all rows), with the trainer's clipping: sparse tables by their own
    limits, the rest by the global norm."""
    from neotron.arch.memory import clip_sparse_grads_, dense_params
    from neotron.optim.builder import build_optimizer
    from neotron.train.parallel import all_reduce_sum, clip_grads_, grad_sq_norm

    world, dp, dp_rank = (env.world_size, env.dp_world, env.dp_rank) if env else (1, 1, 0)
    opt = build_optimizer(model, cfg.optim)
    if optimizer is not None:
        optimizer.append(opt)
    first, losses = {}, []
    for step, x in enumerate(batches()):
        rows = x.shape[0] // dp
        logits, loss = loss_of(model, x[dp_rank * rows:(dp_rank + 1) * rows])
        loss.backward()  # FSDP2 averages the gradients over dp: the full batch's mean
        if step == 0:
            first = {"logits": logits.detach().clone(), "grads": _full_grads(model)}
        clip_sparse_grads_(model, cfg.optim.grad_clip)
        params = dense_params(model)
        sq = grad_sq_norm(params, world)
        norm = (all_reduce_sum(sq, env) if env is not None else sq).sqrt()
        clip_grads_(params, cfg.optim.grad_clip, norm)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        losses.append(all_reduce_sum(loss, env) / world if env is not None else loss)
    return first, torch.stack(losses)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: _full(p.grad).clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize("kind,tp,overrides,key,message", [
    ("memory", 4, [f"{M}v_dim=30"], f"{M}v_dim",
     "v_dim=30 is not divisible by parallel.tp=4 (the value table is split along the value"),
    ("memory", 4, [f"{M}parallel_ffn.type=swiglu", f"{M}parallel_ffn.hidden_dim=66"],
     f"{M}parallel_ffn.hidden_dim", "hidden_dim=66 is not divisible by parallel.tp=4"),
    ("ultramem", 4, [f"{U}pre_dim=18", f"{U}v_dim=16"], f"{U}pre_dim",
     "pre_dim=18 is not divisible by parallel.tp=4"),
    ("ultramem", 3, [f"{U}tucker_cores=2", f"{U}v_dim=24", f"{U}pre_dim=24"],
     f"{U}tucker_cores", "tucker_cores=2 and parallel.tp=3: one must divide the other"),
    ("ultramem", 2, [f"{U}expand=2"], f"{U}expand", "expand=2 has no tensor-parallel plan"),
    ("memoryformer", 3, ["model.blocks.memoryformer.ffn.tau=3"],
     "model.blocks.memoryformer.ffn.tau",
     "model.dim / tau = 32 hash tables per layer is not divisible by parallel.tp=3"),
    ("memoryformer", 2, ["model.blocks.memoryformer.mixer.qk_norm=true"],
     "model.blocks.memoryformer.mixer.qk_norm", "qk_norm has no tensor-parallel plan"),
    ("tokenformer", 4, [f"{T}ffn.n_tokens=66"], f"{T}ffn.n_tokens",
     "n_tokens=66 is not divisible by parallel.tp=4"),
    ("tokenformer", 4, ["model.linear.n_tokens=18"], "model.linear.n_tokens",
     "n_tokens=18 is not divisible by parallel.tp=4"),
])
def test_config_errors_name_the_key(kind, tp, overrides, key, message):
    """Reported at config load, one line naming the key; every other shape divides by tp."""
    from neotron.config import load
    from neotron.errors import ConfigError

    shapes = SHAPES[kind]
    blocks = ("attention", "memory") if kind == "memory" else (kind,)
    heads = [f"model.blocks.{b}.mixer.{h}={tp * 2}" for b in blocks
             for h in ("n_heads", "n_kv_heads")]
    with pytest.raises(ConfigError) as e:
        load(ROOT / "configs" / "demo" / f"{kind}.yaml",
             [*COMMON, *shapes, *heads, f"model.vocab_size={512 * tp}",
              f"data.tokenizer.vocab_size={512 * tp}", f"model.dim={32 * tp}",
              f"parallel.tp={tp}", *overrides])
    assert f"{key}: " in str(e.value) and message in str(e.value), str(e.value)


def test_memory_models_have_no_unplanned_parameters():
    from neotron.arch import build_model
    from neotron.arch.tp_plans import tp_config_errors, unplanned_parameters

    for case in CASES:
        cfg = case_cfg(case, "parallel.tp=2")
        assert tp_config_errors(cfg.model, 2) == [], case
        assert unplanned_parameters(build_model(cfg.model)) == [], case


# ------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every collective dispatched, as (op name, shape of its tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        name = func.__name__
        if (ns in ("_c10d_functional", "c10d", "c10d_functional")
                and "wait" not in name and "wrap" not in name):
            first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            self.calls.append((func.__name__.split(".")[0], list(first.shape)))
        return func(*args, **(kwargs or {}))


def _collectives(layer, x: torch.Tensor) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    with CommDebugMode() as fwd_counts, _Recorder() as fwd:
        y = layer(x, None)
    with CommDebugMode() as bwd_counts, _Recorder() as bwd:
        y.square().sum().backward()
    for name, counts, rec in (("forward", fwd_counts, fwd), ("backward", bwd_counts, bwd)):
        out[name] = {"calls": rec.calls,
                     "counts": {str(k): v for k, v in counts.get_comm_counts().items()}}
    return out


def _worker(rank: int, world: int, port: int, out: str, dp_shard: int, cases: list[str],
            comm: bool) -> None:
    import torch.distributed as dist

    from neotron.arch import build_model, materialize
    from neotron.arch.context import BuildContext
    from neotron.arch.linear import DenseLinearConfig
    from neotron.arch.memory import ProductKeyMemory, ProductKeyMemoryConfig
    from neotron.arch.ultramem import UltraMem, UltraMemConfig
    from neotron.train.parallel import apply_tp, parallelize, setup_env

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results: dict = {}
    env = None
    for case in cases:
        cfg = case_cfg(case, f"parallel.tp={world // dp_shard}", f"parallel.dp_shard={dp_shard}")
        env = setup_env(cfg) if env is None else env  # the first call creates the group
        model = parallelize(materialize(build_model(cfg.model), "cpu", cfg.train.seed), env,
                            cfg.train)
        opt: list = []
        first, losses = train(model, cfg, env, opt)
        if case in CHECKPOINTED:  # the trainer's DCP checkpoint, for a resume on 1 process
            from neotron.train.checkpoint import Checkpointer

            Checkpointer(Path(out).parent / case, keep_last=1, is_writer=rank == 0).save(
                STEPS, model, opt[0], {})
        perms = [m.perm.clone() for m in model.modules() if isinstance(m, UltraMem)]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, perms)
        placements = {n: str(p.placements[-1]) if hasattr(p, "placements") else "plain"
                      for n, p in model.named_parameters()}  # on the tp mesh
        results[case] = {**first, "losses": losses, "perms": gathered, "placements": placements,
                         "params": {n: _full(p).detach().clone()
                                    for n, p in model.named_parameters()}}

    # One memory layer alone (no parallel FFN, no gate): its collectives, forward and backward.
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ctx = BuildContext(dim=32, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.2)
    layers = (
        ("memory", ProductKeyMemory(ctx, cfg=ProductKeyMemoryConfig(
            n_keys=8, heads=2, knn=4, k_dim=16))),
        ("ultramem", UltraMem(ctx, cfg=UltraMemConfig(
            n_keys=16, knn=4, k_dim=8, v_dim=16, pre_dim=16, parallel_ffn=None))),
    )
    for name, layer in layers if comm else ():
        torch.manual_seed(0)
        layer.init_weights()
        holder = torch.nn.ModuleDict({"layer": layer})
        apply_tp(holder, env.mesh["tp"])
        results[f"comm_{name}"] = _collectives(layer, x)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def launch(tmp_path: Path, world: int, dp_shard: int, cases: list[str], comm: bool) -> dict:
    """`world` forked workers. Fork, not spawn: the workers inherit the imported modules
    (on a busy 2-core machine, four spawned interpreters spend ~40 s importing torch and
    neotron); no process group exists in this process, and each worker runs one thread."""
    import torch.multiprocessing as mp

    import neotron.optim.builder  # noqa: F401  (imported once, here, for the forks)
    import neotron.train.parallel  # noqa: F401

    case_cfg(cases[0])
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(world, _free_port(), str(out), dp_shard, cases, comm),
                       nprocs=world, start_method="fork")
    return torch.load(out)


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp-memory")


@pytest.fixture(scope="module")
def tp_results(tp_dir) -> dict:
    return launch(tp_dir, TP, 1, list(CASES), comm=True)


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_tp2_checkpoint_resumes_on_one_process(tp_results, tp_dir, case):
    """The value-dim shards (DTensors) go through DCP like any parameter: the tp=2 checkpoint
    loads into a 1-process model (and its optimizer) as the gathered tp=2 weights."""
    from neotron.arch import build_model, materialize
    from neotron.optim.builder import build_optimizer
    from neotron.train.checkpoint import Checkpointer

    cfg = case_cfg(case)
    model = materialize(build_model(cfg.model), "cpu", cfg.train.seed + 1)  # other weights
    opt = build_optimizer(model, cfg.optim)
    ckpt = Checkpointer(tp_dir / case, keep_last=1)
    ckpt.load(ckpt.latest(), model, opt)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), tp_results[case]["params"][name]), name
    assert len(opt.state) == len({id(p) for p in model.parameters()})  # Adam moments loaded


def assert_matches_one_process(got: dict, case: str, dp: int = 1) -> None:
    from neotron.arch import build_model, materialize

    cfg = case_cfg(case)
    ref = materialize(build_model(cfg.model), "cpu", cfg.train.seed)
    first, losses = train(ref, cfg)
    rows = first["logits"].shape[0] // dp  # rank 0's data-parallel slice
    torch.testing.assert_close(got["logits"], first["logits"][:rows], rtol=1e-5, atol=1e-5)
    assert got["grads"].keys() == first["grads"].keys()
    for name, g in first["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    kind = CASES[case][0]
    if kind == "memoryformer":
        # Hash codes are the signs of activations: the row-parallel layer's all-reduce sums
        # in another order than one process, and once a rounding-level difference flips the
        # sign of an activation near zero (measured: at step 3 with score=paper) the runs read
        # different table rows. Step 1 (logits, every gradient) is compared strictly above;
        # the later losses loosely, the parameters not.
        torch.testing.assert_close(got["losses"], losses, rtol=1e-4, atol=1e-5)
        return _assert_layout(got, kind)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
    # After 3 Adam steps: Adam divides each gradient by its own running RMS, so an element
    # whose gradient is near zero turns fp32 rounding into a visible step; 5e-4 is 5% of one
    # step at lr 1e-2 (a wrong shard or a missing all-reduce moves whole rows by ~lr).
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-4, atol=5e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    _assert_layout(got, kind)


def _assert_layout(got: dict, kind: str) -> None:
    # the layouts are the ones the plans promise: memory tables split along the value
    # dimension (not replicated, not by rows), the Pattention FFN's tokens split
    from torch.distributed.tensor import Replicate, Shard

    at = got["placements"]
    if kind in ("memory", "ultramem"):
        tables = {n: pl for n, pl in at.items() if n.endswith(("ffn.values", "ffn.pre_values"))}
        assert tables and set(tables.values()) == {str(Shard(1))}, tables
    elif kind == "memoryformer":
        assert at["layers.0.mixer.wq.tables"] == at["layers.0.ffn.up.tables"] == str(Shard(2))
        assert at["layers.0.ffn.down.tables"] == str(Shard(0))
    else:
        assert at["layers.0.ffn.pattention.keys"] == at["layers.0.ffn.pattention.values"] \
            == str(Shard(0))
        assert at["layers.0.mixer.wq.values"] == str(Shard(1))
        assert at["layers.0.mixer.wq.keys"] == str(Replicate())
        assert at["layers.0.mixer.wo.keys"] == str(Shard(0))


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_one_process(tp_results, case):
    assert_matches_one_process(tp_results[case], case)


def test_dp_shard2_x_tp2_equals_one_process(tmp_path):
    """FSDP2 over dp on top: each tp-local table shard is itself sharded over dp (4 gloo
    processes; the slowest test here)."""
    cases = ["memory_shared_gated_ffn", "ultramem_shared_pool"]
    got = launch(tmp_path, 4, 2, cases, comm=False)
    for case in cases:
        assert_matches_one_process(got[case], case, dp=2)


def test_permutation_is_identical_on_every_rank(tp_results):
    from neotron.arch import build_model, materialize
    from neotron.arch.ultramem import UltraMem

    for case in ("ultramem_shared_pool", "ultramem_one_core_gelu_own"):
        rank0, rank1 = tp_results[case]["perms"]
        cfg = case_cfg(case)
        ref = [m.perm for m in materialize(build_model(cfg.model), "cpu", 0).modules()
               if isinstance(m, UltraMem)]
        assert len(rank0) == len(ref) == cfg.model.n_layers
        for a, b, r in zip(rank0, rank1, ref):
            assert torch.equal(a, b) and torch.equal(a, r)
        assert not torch.equal(rank0[0], rank0[1])  # per-layer permutations differ


@pytest.mark.parametrize("kind", ["memory", "ultramem"])
def test_collectives_of_one_memory_layer(tp_results, kind):
    """N = 24 tokens, dim 32; memory: 2 heads x 4 slots, v = 32 (table 64 x 32); ultramem:
    1 head x 4 slots, 2 cores, v = pre_dim = 16 (tables 512 x 16)."""
    res = tp_results[f"comm_{kind}"]
    fwd, bwd = res["forward"], res["backward"]
    if kind == "memory":
        # forward: W_o's all-reduce; backward: W_s's input gradient, the retrieval weights'
        # gradient (each rank's dot products over its value columns)
        want_fwd = [("all_reduce", [24, 32])]
        want_bwd = sorted([("all_reduce", [24, 32]), ("all_reduce", [24, 8])])
        table = 64 * 32
    else:
        # forward: the pre-value scores' partial dot products, then W_o's all-reduce;
        # backward: W_pre's input gradient, the per-core weights' gradient
        want_fwd = [("all_reduce", [24, 4]), ("all_reduce", [24, 32])]
        want_bwd = sorted([("all_reduce", [24, 32]), ("all_reduce", [24, 4, 2])])
        table = 512 * 16
    assert [tuple(c) for c in fwd["calls"]] == want_fwd, fwd
    assert sorted(tuple(c) for c in bwd["calls"]) == want_bwd, bwd
    for counts in (fwd["counts"], bwd["counts"]):
        assert not any("gather" in op or "scatter" in op for op in counts), counts
        assert sum(counts.values()) == len(want_fwd if counts is fwd["counts"] else want_bwd)
    for _, shape in fwd["calls"] + bwd["calls"]:
        assert torch.Size(shape).numel() < table

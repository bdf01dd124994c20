"""Parameter routing (which optimizer trains which parameter), the builder, and Muon runs of
the demo config end to end.

The routing of every parameter of every config in configs/demo/ is checked against an
expectation written here from the parameter's *name* alone, independent of the router's
rules (module types, shapes): a new block whose parameters match no expectation fails the test
until someone decides where they belong, so nothing silently falls back to AdamW (the failure
Megatron PR ISEEKYAN/Megatron-LM#130 shipped with).
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from neotron import cli
from neotron.arch import build_model
from neotron.config import OptimConfig, load
from neotron.errors import ConfigError
from neotron.optim.builder import build_optimizer
from neotron.optim.muon import Muon
from neotron.optim.normuon import NorMuon
from neotron.optim.routing import param_groups, plan_groups, route, routing_table
from neotron.train.checkpoint import Checkpointer
from tests.conftest import ROOT, run_cli

# Every demo config, globbed: configs added later are covered without touching this file.
DEMOS = sorted((ROOT / "configs" / "demo").glob("*.yaml"))
DEMO = ROOT / "configs" / "demo" / "llama.yaml"

# Name pattern -> expected role. Written from names, on purpose not from the router's rules.
# Add a line when a new block brings new parameters.
EXPECTED: list[tuple[str, str]] = [
    (r"embed\.weight", "embed"),
    (r"head\.weight", "head"),
    # Hidden projections: attention, DeltaNet (wb/wa/wg), TTT (wlr), memory (query/wo/ws), SwiGLU.
    (r"layers\.\d+\.mixer\.(wq|wk|wv|wo|wb|wa|wg|wlr)\.weight", "matrix"),
    # UltraMem: pre-value projection (pre) and the parallel FFN (ffn.w*).
    (r"layers\.\d+\.ffn\.(ffn\.)?(w1|w2|w3|query|wo|ws|pre)\.weight", "matrix"),
    # TokenFormer: Pattention's parameter tokens are the two weight matrices of a linear-like
    # layer (x K^T, then . V): a decision, see docs/optimizers.md.
    (r"layers\.\d+\.mixer\.(wq|wk|wv|wo)\.(keys|values)", "matrix"),
    (r"layers\.\d+\.ffn\.pattention\.(keys|values)", "matrix"),
    # Sparse tables: product-key memory values, MemoryFormer hash tables.
    (r"layers\.\d+\.ffn\.(values|pre_values)", "sparse"),
    (r"layers\.\d+\.(mixer|ffn)\.\w+\.tables", "sparse"),
    # AdamW with decay: product keys [heads, 2, n, k/2], TTT's per-head inner weights
    # [heads, d, d'], depthwise short-conv kernels [C, K].
    # UltraMem's Tucker cores; the MoL router (a small [experts, dim] matrix, as MoE routers).
    (r"layers\.\d+\.ffn\.(keys|cores|router)", "adamw"),
    # Per-depth LoRA (relaxed recursion) and MoL experts: their own AdamW group, no decay.
    (r"layers\.\d+\.(lora\.adapters\.\w+|ffn\.experts\.w[123])\.(A|B)", "lora"),
    (r"layers\.\d+\.mixer\.W[012]", "adamw"),
    (r"layers\.\d+\.mixer\.(q|k|v)_conv\.weight", "adamw"),
    # No decay: gains, biases, decay/step-size parameters, TTT inner biases and norms.
    (r"layers\.\d+\.mixer\.(A_log|dt_bias|token_eta_offset|b[012])", "no_decay"),
    (r"layers\.\d+\.mixer\.ttt_norm_(weight|bias)", "no_decay"),
    (r"layers\.\d+\.ffn\.(q|k)_norm", "no_decay"),  # UltraMem query/key LayerNorm gains
    (r"(.*\.)?\w*norm\.weight", "no_decay"),  # RMSNorm/LayerNorm gains
    (r".*\.bias", "no_decay"),
]


def expected_role(name: str) -> str:
    for pattern, role in EXPECTED:
        if re.fullmatch(pattern, name):
            return role
    raise AssertionError(
        f"no routing expectation for parameter {name!r}: decide which optimizer it needs and "
        "add a line to EXPECTED in tests/test_routing.py (and tag it in its block if the "
        "router's default is wrong, see docs/optimizers.md)"
    )


@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["adamw", "muon", "normuon"])
def test_every_config_routes_every_parameter_as_expected(path, name):
    cfg = load(path, [f"optim.name={name}"])
    model = build_model(cfg.model)  # meta device: routing needs shapes and types only
    groups = param_groups(model)
    routed = {n: role for role, members in groups.items() for n, _ in members}
    assert routed.keys() == {n for n, p in model.named_parameters()}  # every one, once
    wrong = {n: (r, expected_role(n)) for n, r in routed.items() if r != expected_role(n)}
    assert not wrong, f"(routed, expected): {wrong}"

    opt = build_optimizer(model, cfg.optim)  # on meta parameters too
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        g = by_param[id(p)]
        # a role may split into groups by lr scale or weight decay (sparse_lr4x, sparse_wd0.1)
        assert g["name"] == routed[n] or g["name"].startswith(routed[n] + "_"), (n, g["name"])
        if name != "adamw":
            assert g["algorithm"] == (name if routed[n] == "matrix" else "adamw"), n
    if name != "adamw" and "matrix" in groups:  # (MemoryFormer's projections are all tables)
        assert opt.param_groups[0]["name"] == "matrix"  # the trainer logs group 0's lr


# Parameter attributes (`p._neotron_group`) die with the Parameter object when FSDP2 replaces
# it; module-level `_neotron_param_groups` survive. This catches a block that tags Parameters.
@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.name)
def test_routing_survives_fully_shard(path):
    # The trainer's order: build on meta, materialize (to_empty + init_weights), fully_shard
    # every block then the root, build the optimizer. Materialized on the meta device here:
    # the same Parameter replacements, no memory, no compute.
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from neotron.arch import materialize

    model = materialize(build_model(load(path).model), "meta", 0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        routed = {n: r for r, members in param_groups(model).items() for n, _ in members}
    finally:
        dist.destroy_process_group()
    wrong = {n: (r, expected_role(n)) for n, r in routed.items() if r != expected_role(n)}
    assert not wrong, f"(routed, expected): {wrong}"


# ----------------------------------------------------------------------------- rules


class _Toy(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)  # weight: matrix, bias: no_decay
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(torch.zeros(32, 4))  # 2-D, not a linear layer
        self.stack = nn.Parameter(torch.zeros(2, 8, 8))  # > 2-D
        self.scale = nn.Parameter(torch.ones(()))
        self.table = nn.EmbeddingBag(64, 16)
        self.table._neotron_param_groups = {"weight": "sparse"}  # module-level tag
        self.lora = nn.Parameter(torch.zeros(4, 16))
        self.lora._neotron_group = "matrix"  # parameter-level tag
        self.norm = nn.LayerNorm(16)
        self.head = None if tied else nn.Linear(16, 50, bias=False)


def test_route_rules():
    m = _Toy()
    roles = {n: route(n, p, m) for n, p in m.named_parameters()}
    assert roles == {
        "embed.weight": "embed", "proj.weight": "matrix", "proj.bias": "no_decay",
        "conv.weight": "adamw", "stack": "adamw", "scale": "no_decay", "table.weight": "sparse",
        "lora": "matrix", "norm.weight": "no_decay", "norm.bias": "no_decay",
        "head.weight": "head",
    }
    tied = _Toy(tied=True)
    assert "head" not in param_groups(tied)
    assert "(tied: also the LM head)" in routing_table(tied)


def test_module_tags_survive_meta_materialization_param_tags_do_not():
    with torch.device("meta"):
        m = _Toy()
    m.to_empty(device="cpu")  # replaces every Parameter object
    roles = {n: route(n, p, m) for n, p in m.named_parameters()}
    assert roles["table.weight"] == "sparse"  # module attribute: kept
    assert roles["lora"] == "adamw"  # Parameter attribute: gone with the old Parameter


def test_unknown_tag_is_an_error():
    m = _Toy()
    m.proj.weight._neotron_group = "muon"
    with pytest.raises(ValueError, match="tagged 'muon'.*one of"):
        param_groups(m)


def test_group_settings_follow_config():
    m = _Toy()
    cfg = OptimConfig(name="normuon", lr=0.02, adjust_lr="original", adamw_lr=1e-3,
                      weight_decay=0.01, adamw_weight_decay=0.1, sparse_lr=5e-3)
    plans = {p.name: p for p in plan_groups(m, cfg)}
    assert list(plans)[0] == "matrix"
    assert (plans["matrix"].algorithm, plans["matrix"].lr, plans["matrix"].weight_decay) == (
        "normuon", 0.02, 0.01)
    assert (plans["head"].lr, plans["head"].weight_decay) == (1e-3, 0.1)
    assert (plans["embed"].lr, plans["embed"].weight_decay) == (1e-3, 0.0)
    assert (plans["sparse"].lr, plans["sparse"].weight_decay) == (5e-3, 0.0)
    assert (plans["adamw"].algorithm, plans["adamw"].weight_decay) == ("adamw", 0.1)
    opt = build_optimizer(m, cfg)
    assert isinstance(opt, NorMuon)
    assert [g["base_lr"] for g in opt.param_groups] == [p.lr for p in plans.values()]
    table = routing_table(m)  # remembers the config the optimizer was built with
    assert re.search(r"matrix\s+normuon\s+2\.00e-02\s+0\.01\s+2\s", table)
    assert re.search(r"sparse\s+adamw\s+5\.00e-03\s+0\s+1\s+1,024", table)


def test_adamw_is_plain_torch_adamw_with_the_same_groups():
    m = _Toy()
    opt = build_optimizer(m, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"matrix": 0.1, "embed": 0.0, "head": 0.1, "no_decay": 0.0, "sparse": 0.0,
                  "adamw": 0.1}


def test_original_units_need_an_adamw_lr():
    with pytest.raises(ConfigError, match=r"optim\.adamw_lr: required"):
        load(DEMO, ["optim.name=muon", "optim.adjust_lr=original"])
    load(DEMO, ["optim.name=muon", "optim.adjust_lr=original", "optim.lr=0.02",
                "optim.adamw_lr=3e-3"])


def test_cli_config_prints_the_routing_table_as_comments(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["config", str(DEMO), "optim.name=muon"]) == 0
    text = out.getvalue()
    assert re.search(r"# +matrix +muon +3\.00e-03 +0\.1 +28 +1,572,864", text)
    assert "layers.*.mixer.{wq,wk,wv,wo}.weight" in text
    assert yaml.safe_load(text)["optim"]["name"] == "muon"  # still valid YAML


# ----------------------------------------------------------------------------- the optimizer


def _toy_grads(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_adamw_groups_match_torch_adamw_bitwise():
    torch.manual_seed(0)
    a, b = nn.Linear(7, 5), nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ours = Muon([{"params": [a.weight, a.bias], "algorithm": "adamw", "lr": 3e-3,
                  "weight_decay": 0.1}], adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    ref = torch.optim.AdamW(b.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, foreach=False)
    for step in range(5):
        _toy_grads(a, step)
        _toy_grads(b, step)
        ours.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert ours.state[p].keys() == ref.state[q].keys()
        assert all(torch.equal(ours.state[p][k], ref.state[q][k]) for k in ref.state[q])


def test_adamw_group_defaults_are_adamw_not_muon():
    w = torch.zeros(3, 3, requires_grad=True)
    opt = Muon([{"params": [w], "algorithm": "adamw"}], eps=1e-7)
    assert opt.param_groups[0]["eps"] == 1e-8  # not Newton-Schulz's eps
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="algorithm"):
        Muon([{"params": [w], "algorithm": "sgd"}])


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_checkpointer_round_trip_reproduces_the_run(tmp_path, name):
    cfg = load(DEMO, [f"optim.name={name}", "model.dim=32", "model.n_layers=2",
                      "model.vocab_size=300", "data.tokenizer.vocab_size=300", "model.blocks.attention.mixer.n_heads=2",
                      "model.blocks.attention.mixer.n_kv_heads=1", "model.tie_embeddings=false"])
    tokens = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(0))

    def make(seed):
        from neotron.arch import materialize

        model = materialize(build_model(cfg.model), "cpu", seed)
        return model, build_optimizer(model, cfg.optim)

    def step(model, opt):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    model, opt = make(0)
    straight = [step(model, opt) for _ in range(4)]
    model, opt = make(0)
    [step(model, opt) for _ in range(2)]
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(2, model, opt, {"tokens": 0})
    model2, opt2 = make(1)
    ck.load(ck.latest(), model2, opt2, restore_rng=False)
    resumed = [step(model2, opt2) for _ in range(2)]
    assert resumed == straight[2:]  # bit for bit
    assert {k for s in opt2.state.values() for k in s} >= {"momentum_buffer", "exp_avg"}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Four plays cut into 20 kB files, tokenized: ~2 s (the full corpus takes ~30 s here)."""
    from neotron.data.corpus import shakespeare_texts
    from neotron.data.prepare import prepare

    d = tmp_path_factory.mktemp("plays")
    texts = shakespeare_texts()
    for name in sorted(texts)[:4]:
        for i in range(0, len(texts[name]), 20000):
            (d / f"{name}-{i:07d}.txt").write_text(texts[name][i:i + 20000])
    prepare(load(DEMO, _tiny(d / "unused", d)).data)
    return d


def _tiny(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", "data.source=files", f"data.paths=[{corpus}/*.txt]",
        f"data.dir={corpus}/prepared", "data.tokenizer.vocab_size=512", "data.seq_len=32",
        "data.val_fraction=0.1", "model.vocab_size=512", "model.dim=32", "model.n_layers=2",
        "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1",
        "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.steps=16",
        "optim.lr=1e-2", "optim.schedule.warmup_steps=2", "eval.every=8", "eval.batches=2",
        "eval.batch_size=4", "checkpoint.every=0", "log.every=1", *extra,
    ]


def _losses(run_dir: Path, key: str) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in recs if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_demo_config_trains_with(name, tmp_path, small_corpus):
    proc = run_cli("train", str(DEMO), *_tiny(tmp_path, small_corpus, f"optim.name={name}"),
                   check=True)
    assert re.search(rf"matrix\s+{name}\s+1\.00e-02", proc.stdout)  # the routing table
    assert len(_losses(tmp_path, "loss")) == 16
    val = _losses(tmp_path, "val_loss")
    # Measured: 6.245 -> 5.52 (muon), 5.53 (normuon); AdamW at the same lr: 5.35.
    assert [s for s, _ in val] == [0, 8, 16] and val[-1][1] < val[0][1] - 0.4, val

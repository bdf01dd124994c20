"""Recursive (looped) stacks and relaxed recursion against unrolled dense models.

The oracle of a looped model is the plain dense CausalLM (no recursion code runs in it) with
n_layers * loops layers whose weights are copied by hand: dense layer k L + i gets the looped
block i's tensors (CYCLE sharing), and for relaxed recursion its target projections get the
materialized W' + (alpha / r) B_k A_k. Compared in fp64: logits, and gradients, the shared
weight's gradient against the sum of the dense gradients over its tied positions.

Every demo config's blocks are looped (attention, DeltaNet, Gated DeltaNet, TTT-Linear/MLP,
hybrid, product-key memory with a shared table, MemoryFormer, TokenFormer). UltraMemV2 is
looped too but has no tied-dense oracle: its slot permutation and pool offset depend on the
layer index (a looped layer keeps its index), so only a finite training step is checked.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.context import SeqInfo
from neotron.config import load
from neotron.errors import ConfigError
from tests.conftest import ROOT
from tests.test_distributed import corpus  # noqa: F401 (the fixture: 8 plays, 512-token BPE)

DEMO = ROOT / "configs" / "demo"
ORACLE_DEMOS = ["llama", "deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp", "hybrid",
                "memory", "memoryformer", "tokenformer"]


def demo_model(name: str, **kw) -> ModelConfig:
    data = load(DEMO / f"{name}.yaml").model.model_dump()
    data.update(kw)
    return ModelConfig.model_validate(data)


def unrolled_config(cfg: ModelConfig) -> ModelConfig:
    """The dense config with every loop written out: L K layers, block_at repeated."""
    L, K = cfg.n_layers, cfg.recursion.loops
    data = cfg.model_dump()
    data.update(n_layers=L * K, recursion=None,
                block_at={n: [i + k * L for k in range(K) for i in idx]
                          for n, idx in cfg.block_at.items()})
    if cfg.pattern is not None:
        assert L % len(cfg.pattern) == 0  # the pattern then repeats the same way
    return ModelConfig.model_validate(data)


def tied_state(looped_state: dict, cfg: ModelConfig, lora_scale: float | None = None) -> dict:
    """The dense model's state dict from the looped one: written out loop by loop, LoRA
    materialized into the projections, per-loop norm gains split."""
    L, K = cfg.n_layers, cfg.recursion.loops
    out = {}
    for key, t in looped_state.items():
        if not key.startswith("layers."):
            out[key] = t
            continue
        _, i, rest = key.split(".", 2)
        if ".lora." in f".{rest}":
            continue
        for k in range(K):
            w = t
            if rest.endswith("_norm.weight") and t.ndim == 2:  # per-loop gains [K, dim]
                w = t[k]
            if lora_scale is not None and rest.endswith(".weight"):
                path = rest[: -len(".weight")]
                a = looped_state.get(f"layers.{i}.lora.adapters.{path.replace('.', '_')}.A")
                if a is not None:
                    b = looped_state[f"layers.{i}.lora.adapters.{path.replace('.', '_')}.B"]
                    w = t + lora_scale * (b[k] @ a[k])
            out[f"layers.{int(i) + k * L}.{rest}"] = w.clone()
    return out


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def _tokens(cfg: ModelConfig, T: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, cfg.vocab_size, (2, T), generator=g)


@pytest.mark.parametrize("name", ORACLE_DEMOS)
def test_looped_equals_unrolled_with_tied_layers(name):
    cfg = demo_model(name, recursion={"loops": 3})
    looped = materialize(build_model(cfg), "cpu", seed=0).double()
    dense = build_model(unrolled_config(cfg), "cpu").double()
    dense.load_state_dict(tied_state(looped.state_dict(), cfg), strict=True)
    assert len(looped.layers) == cfg.n_layers and len(dense.layers) == 3 * cfg.n_layers
    tokens = _tokens(cfg)
    tokens[0, 9] = 0  # a document boundary: recurrent mixers restart their state there
    seq = SeqInfo.for_tokens(tokens, 0)
    out, ref = looped(tokens, seq), dense(tokens, seq)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    target = torch.randn_like(ref)
    (out * target).sum().backward()
    (ref * target).sum().backward()
    grads = dict(dense.named_parameters())
    L = cfg.n_layers
    for key, p in looped.named_parameters():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            # a table shared by all memory layers (memory.yaml's share_values) is one dense
            # Parameter, listed once, under its first layer: its gradient sums all uses
            names = [f"layers.{int(i) + k * L}.{rest}" for k in range(3)]
            want = sum(_dense_grad(grads[n].grad) for n in names if n in grads)
        else:
            want = _dense_grad(grads[key].grad)
        torch.testing.assert_close(_dense_grad(p.grad), want, rtol=1e-8, atol=1e-10,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_params_stored_once_and_flops_count_every_loop():
    plain = demo_model("llama")
    looped_cfg = demo_model("llama", recursion={"loops": 3})
    looped, dense = build_model(looped_cfg), build_model(unrolled_config(looped_cfg))
    assert looped.num_params() == build_model(plain).num_params()
    T = 128
    assert looped.flops_per_token(T) == pytest.approx(dense.flops_per_token(T))
    from neotron.arch.stack import param_summary

    assert "effective depth 12 = 4 layers x 3 loops" in param_summary(looped)
    assert param_summary(build_model(plain)) is None


def test_looped_model_inits_with_the_effective_depth():
    cfg = demo_model("llama", recursion={"loops": 4})
    m = materialize(build_model(cfg), "cpu", seed=0)
    std = m.layers[0].mixer.wo.weight.std().item()
    want = 0.02 / math.sqrt(2 * 16)  # out_std of a 16-layer model (truncation: ~0.88x)
    assert 0.8 * want < std < 1.05 * want
    stack = materialize(build_model(demo_model(
        "llama", recursion={"loops": 4, "init_depth": "stack"})), "cpu", seed=0)
    assert stack.layers[0].mixer.wo.weight.std().item() > 1.8 * std


# ---------------------------------------------------------------- relaxed recursion

RELAXED = {"loops": 2, "lora": {"rank": 3, "alpha": 12.0, "per_depth_norms": True}}


@pytest.mark.parametrize("name", ["llama", "hybrid"])
def test_relaxed_equals_unrolled_with_w_plus_ba_per_depth(name):
    cfg = demo_model(name, recursion=RELAXED)
    looped = materialize(build_model(cfg), "cpu", seed=0).double()
    with torch.no_grad():  # B = 0 at init: give every adapter and per-loop gain a value
        for key, p in looped.named_parameters():
            if ".lora." in key or (key.endswith("_norm.weight") and p.ndim == 2):
                p.add_(torch.randn_like(p) * 0.05)
    dense = build_model(unrolled_config(cfg), "cpu").double()
    dense.load_state_dict(tied_state(looped.state_dict(), cfg, lora_scale=12.0 / 3), strict=True)
    tokens = _tokens(cfg)
    out, ref = looped(tokens), dense(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    out.square().mean().backward()
    ref.square().mean().backward()
    dg = {k: p.grad for k, p in dense.named_parameters()}
    blk = looped.layers[0]
    # shared weight: the sum over its two positions; the adapters: the chain rule through
    # W_k = W' + s B_k A_k, i.e. dL/dB_k = s dW_k A_k^T and dL/dA_k = s B_k^T dW_k
    wq = "mixer.wq"  # attention in llama, DeltaNet in hybrid (block 0)
    torch.testing.assert_close(blk.get_submodule(wq).weight.grad,
                               dg[f"layers.0.{wq}.weight"] + dg[f"layers.{cfg.n_layers}.{wq}.weight"])
    f = blk.lora.adapters[wq.replace(".", "_")]
    for k in range(2):
        dW = dg[f"layers.{k * cfg.n_layers}.{wq}.weight"]
        torch.testing.assert_close(f.B.grad[k], 4.0 * dW @ f.A[k].T)
        torch.testing.assert_close(f.A.grad[k], 4.0 * f.B[k].T @ dW)
        torch.testing.assert_close(blk.mixer_norm.weight.grad[k],
                                   dg[f"layers.{k * cfg.n_layers}.mixer_norm.weight"])


def test_relaxed_at_init_equals_the_plain_recursive_model():
    relaxed = materialize(build_model(demo_model("llama", recursion={
        "loops": 3, "lora": {"rank": 4}})), "cpu", seed=0).double()
    plain = build_model(demo_model("llama", recursion={"loops": 3}), "cpu").double()
    state = {k: v for k, v in relaxed.state_dict().items() if ".lora." not in k}
    plain.load_state_dict(state, strict=True)
    assert all(f.B.abs().max() == 0 for layer in relaxed.layers
               for f in layer.lora.adapters.values())
    tokens = _tokens(relaxed.cfg)
    torch.testing.assert_close(relaxed(tokens), plain(tokens), rtol=0, atol=0)


def test_lora_targets_flops_routing_and_errors():
    from neotron.config import OptimConfig
    from neotron.optim.routing import param_groups, routing_table

    cfg = demo_model("llama", recursion={"loops": 2, "lora": {"rank": 4, "targets": ["wq", "w2"]}})
    m = build_model(cfg)
    assert sorted(m.layers[0].lora.adapters) == ["ffn_w2", "mixer_wq"]
    # LoRA FLOPs: measured against FlopCounterMode in tests/test_flops_measured.py
    groups = param_groups(m)
    assert {n for n, _ in groups["lora"]} == {
        f"layers.{i}.lora.adapters.{t}.{ab}" for i in range(4) for t in ("mixer_wq", "ffn_w2")
        for ab in "AB"}
    table = routing_table(m, OptimConfig(name="muon", lr=0.02, adamw_lr=3e-3))
    assert [ln for ln in table.splitlines() if ln.startswith("lora ")][0].split()[1:4] == \
        ["adamw", "3.00e-03", "0"]
    norms = build_model(demo_model("llama", recursion={"loops": 2, "lora": {
        "per_depth_norms": True}}))
    assert "layers.0.mixer_norm.weight" in {n for n, _ in param_groups(norms)["no_decay"]}
    with pytest.raises(ConfigError, match=r"recursion\.lora\.targets: 'wz' names no projection"):
        build_model(demo_model("llama", recursion={"loops": 2, "lora": {"targets": ["wz"]}}))
    with pytest.raises(ValueError, match="loops"):
        demo_model("llama", recursion={"loops": 0})


# ---------------------------------------------------------------- parallel.py wrappers


@pytest.mark.parametrize("mode", ["full", "selective", "compile", "compile+full"])
def test_checkpointing_and_compile_replay_the_right_loop(mode, monkeypatch):
    from neotron.train import parallel

    monkeypatch.setenv("NEOTRON_COMPILE_BACKEND", "aot_eager")
    cfg = demo_model("llama", dim=48, n_layers=2, vocab_size=101, recursion={
        "loops": 3, "lora": {"rank": 2, "per_depth_norms": True}},
        blocks={"attention": {"mixer": {"type": "attention", "n_heads": 4},
                              "ffn": {"type": "mol", "experts": 3, "rank": 2, "top_k": 2}}})
    ref = materialize(build_model(cfg), "cpu", seed=0)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if ".lora." in key or ".experts." in key:
                p.add_(torch.randn_like(p) * 0.1)
    wrapped = build_model(cfg, "cpu")
    wrapped.load_state_dict(ref.state_dict())
    if "full" in mode or mode == "selective":
        parallel.apply_activation_checkpointing(wrapped, "selective" if mode == "selective"
                                                else "full")
    if "compile" in mode:
        parallel.apply_compile(wrapped)
    tokens = _tokens(cfg, 16)
    from neotron.arch.lora import collect_aux

    losses = []
    for m in (ref, wrapped):
        logits = m(tokens)
        aux, stats = collect_aux(m)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux
        loss.backward()
        losses.append((loss.detach(), aux.detach()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(ref.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: n)


def test_ultramem_and_quantized_projections_train_in_a_loop():
    from neotron.optim.builder import build_optimizer

    for name, rec in (("ultramem", {"loops": 2}),
                      ("bitnet", {"loops": 2, "lora": {"rank": 2}}),
                      ("tokenformer", {"loops": 2, "lora": {"rank": 2, "targets": ["wq"]}})):
        cfg = load(DEMO / f"{name}.yaml")
        mcfg = ModelConfig.model_validate({**cfg.model.model_dump(), "recursion": rec})
        m = materialize(build_model(mcfg), "cpu", seed=0)
        opt = build_optimizer(m, cfg.optim)
        tokens = _tokens(mcfg)
        loss = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        assert abs(loss.item() - math.log(mcfg.vocab_size)) < 1.5, name
        loss.backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, n)
        opt.step()


# ---------------------------------------------------------------- FSDP2, resume

# Relaxed recursion with MoL in the shared FFN, looped twice: tests/test_distributed.py's tiny
# model and launch helpers.
DIST_MODEL = ["model.recursion={loops: 2, lora: {rank: 2, per_depth_norms: true}}",
              "model.blocks.attention.ffn={type: mol, experts: 3, rank: 2, top_k: 2}",
              "eval.per_loop=true"]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_resume(tmp_path, corpus):  # noqa: F811
    from tests.conftest import run_cli
    from tests.test_distributed import args, losses, records, seed_run_from, torchrun

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_cli("train", *args(one, corpus, *DIST_MODEL), check=True)
    proc = torchrun(2, "train", *args(two, corpus, *DIST_MODEL))
    assert "dp_shard 2" in proc.stdout and "effective depth 4 = 2 layers x 2 loops" in proc.stdout
    want = losses(one)
    assert sorted(want) == list(range(1, 9))
    for s in range(1, 9):
        assert losses(two)[s] == pytest.approx(want[s], abs=1e-5), s
    gn = {r["step"]: r["grad_norm"] for r in records(two) if "grad_norm" in r}
    for r in records(one):
        if "grad_norm" in r:
            assert gn[r["step"]] == pytest.approx(r["grad_norm"], abs=1e-5)
    for key in ("val_loss", "val_loss_loop1"):  # and the early exit after loop 1, sharded
        val = {r["step"]: r[key] for r in records(two) if key in r}
        assert val
        for r in records(one):
            if key in r:
                assert val[r["step"]] == pytest.approx(r[key], abs=1e-5)
    # the 2-rank step-4 checkpoint resumed on 1 process continues the same run
    seed_run_from(two / "checkpoints" / "step_00000004", resumed)
    run_cli("train", *args(resumed, corpus, *DIST_MODEL), check=True)
    for s in range(5, 9):
        assert losses(resumed)[s] == pytest.approx(want[s], abs=1e-5), s



# ---------------------------------------------------------------- init from a dense run


def _init_from_trainer(run_dir, data_dir, parent, *extra):
    from neotron.train.trainer import Trainer
    from tests.test_train_e2e import tiny

    t = Trainer(load(tiny(run_dir, data_dir, f"train.init_from={parent}", *extra)[0],
                     tiny(run_dir, data_dir, f"train.init_from={parent}", *extra)[1:]))
    t.metrics.close()
    t.stop.uninstall()
    return t


def test_dense_checkpoint_to_relaxed_recursion(trained_run, data_dir, tmp_path):
    """tiny llama, 2 layers (dim 32, 2 heads, 1 kv head) -> 1 block x 2 loops. Full-rank
    LoRA with per-loop norm gains: the dense function exactly; rank 4: the config's shapes,
    the shared weights the average of the tied layers, each loop's LoRA the best rank-4
    approximation of its residual."""
    from neotron.convert import find_checkpoint, load_model_tensors

    parent = load_model_tensors(find_checkpoint(trained_run)[0])
    dense = build_model(load(tiny_args(trained_run, data_dir)[0],
                             tiny_args(trained_run, data_dir)[1:]).model, "cpu")
    dense.load_state_dict(parent)
    full = _init_from_trainer(tmp_path / "full", data_dir, trained_run, "model.n_layers=1",
                              "model.recursion={loops: 2, lora: {rank: 32, alpha: 8,"
                              " per_depth_norms: true}}")
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(full.model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)
    low = _init_from_trainer(tmp_path / "low", data_dir, trained_run, "model.n_layers=1",
                             "model.recursion={loops: 2, lora: {rank: 4}}")
    state = low.model.state_dict()
    assert state["layers.0.lora.adapters.mixer_wq.A"].shape == (2, 4, 32)
    assert state["layers.0.lora.adapters.mixer_wk.B"].shape == (2, 16, 4)
    assert state["layers.0.ffn_norm.weight"].shape == (32,)
    w0, w1 = parent["layers.0.ffn.w2.weight"], parent["layers.1.ffn.w2.weight"]
    torch.testing.assert_close(state["layers.0.ffn.w2.weight"], (w0 + w1) / 2)
    a, b = state["layers.0.lora.adapters.ffn_w2.A"], state["layers.0.lora.adapters.ffn_w2.B"]
    for k, w in enumerate((w0, w1)):
        residual = (w - (w0 + w1) / 2).double()
        s = torch.linalg.svdvals(residual)
        err = torch.linalg.matrix_norm(residual - (b[k] @ a[k]).double())  # alpha = r: scale 1
        assert err.item() == pytest.approx(s[4:].square().sum().sqrt().item(), rel=1e-4)
    plain = _init_from_trainer(tmp_path / "plain", data_dir, trained_run, "model.n_layers=1",
                               "model.recursion={loops: 2}")
    torch.testing.assert_close(plain.model.state_dict()["layers.0.mixer.wq.weight"],
                               (parent["layers.0.mixer.wq.weight"]
                                + parent["layers.1.mixer.wq.weight"]) / 2)
    with pytest.raises(ConfigError, match="the parent has 2 layers; a recursive model of 3"
                       " layers x 2 loops"):
        _init_from_trainer(tmp_path / "bad", data_dir, trained_run, "model.n_layers=3",
                           "model.recursion={loops: 2}")


def tiny_args(run_dir, data_dir):
    from tests.test_train_e2e import tiny

    return tiny(run_dir, data_dir)


def test_a_deep_copy_uses_its_own_adapters():
    import copy

    m = materialize(build_model(demo_model("llama", dim=48, vocab_size=50, recursion={
        "loops": 2, "lora": {"rank": 2}}, blocks={"attention": {"mixer": {
            "type": "attention", "n_heads": 4}}})), "cpu", seed=0)
    c = copy.deepcopy(m)
    with torch.no_grad():
        for key, p in c.named_parameters():
            if ".lora." in key:
                p.normal_()
    tokens = torch.randint(0, 50, (1, 8))
    assert not torch.allclose(m(tokens), c(tokens))  # B = 0 in m, not in c
    m.load_state_dict(c.state_dict())
    torch.testing.assert_close(m(tokens), c(tokens), rtol=0, atol=0)


# ---------------------------------------------------------------- loss per loop (early exit)

EXIT_LORA = {"rank": 3, "alpha": 6.0, "per_depth_norms": True}


@pytest.mark.parametrize("ffn", ["swiglu", "mol"])
def test_each_loop_exit_equals_an_unrolled_model_of_that_depth(ffn):
    """Exit k of a 3-loop relaxed model (per-loop LoRA and norm gains, optionally a MoL FFN)
    = the plain dense model of k L layers holding loops 0..k-1's materialized weights."""
    from neotron.arch.stack import loop_exits

    blocks = {"attention": {"mixer": {"type": "attention", "n_heads": 6, "n_kv_heads": 2},
                            "ffn": {"type": "swiglu"} if ffn == "swiglu" else
                            {"type": "mol", "experts": 3, "rank": 2, "top_k": 2}}}
    cfg = demo_model("llama", n_layers=2, blocks=blocks,
                     recursion={"loops": 3, "lora": EXIT_LORA})
    looped = materialize(build_model(cfg), "cpu", seed=0).double()
    with torch.no_grad():  # B = 0 at init: make every loop's adapters and gains differ
        for key, p in looped.named_parameters():
            if ".lora." in key or ".experts." in key or (key.endswith("_norm.weight")
                                                         and p.ndim == 2):
                p.add_(torch.randn_like(p) * 0.05)
    tokens = _tokens(cfg)
    B = tokens.shape[0]
    with torch.no_grad():
        with loop_exits(looped) as K:
            exits = looped(tokens)
        last = looped(tokens)  # outside the context: the normal output, the last exit
    assert K == 3 and exits.shape == (3 * B, *last.shape[1:])
    torch.testing.assert_close(exits[2 * B:], last, rtol=0, atol=0)
    for k in (1, 2, 3):
        cfg_k = demo_model("llama", n_layers=2, blocks=blocks,
                           recursion={"loops": k, "lora": EXIT_LORA})
        dense = build_model(unrolled_config(cfg_k), "cpu").double()
        dense.load_state_dict(tied_state(looped.state_dict(), cfg_k, lora_scale=2.0),
                              strict=True)
        with torch.no_grad():
            torch.testing.assert_close(exits[(k - 1) * B:k * B], dense(tokens),
                                       rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"exit {k}: {m}")


def test_eval_per_loop_logs_each_exit_and_rejects_a_plain_stack(tmp_path, data_dir,
                                                                fresh_logging):
    """A 3-step run with eval.per_loop: val_loss_loop1/2 in metrics.jsonl, TensorBoard and
    `neotron eval`, each equal to the cross-entropy of an unrolled dense model of that depth
    (built from the checkpoint's tensors, its own loss loop over the validation windows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from neotron.cli import main
    from neotron.convert import find_checkpoint, load_model_tensors
    from neotron.data.loader import ValLoader
    from neotron.data.prepare import prepare
    from tests.test_train_e2e import records, tiny

    run = tmp_path / "exits"
    args = tiny(run, data_dir, "model.recursion={loops: 2, lora: {rank: 2}}",
                "eval.per_loop=true", "train.steps=3", "eval.every=3", "eval.at_start=false",
                "checkpoint.every=3")
    assert main(["train", *args]) == 0
    rec = [r for r in records(run) if "val_loss" in r][-1]
    assert rec["val_loss_loop2"] == rec["val_loss"]
    cfg = load(args[0], args[1:])
    state = load_model_tensors(find_checkpoint(run)[0], torch.float64)
    data = prepare(cfg.data)
    for k in (1, 2):
        cfg_k = ModelConfig.model_validate({**cfg.model.model_dump(), "recursion": {
            "loops": k, "lora": cfg.model.recursion.lora.model_dump()}})
        dense = build_model(unrolled_config(cfg_k), "cpu").double()
        dense.load_state_dict(tied_state(state, cfg_k, lora_scale=1.0), strict=True)
        losses = []
        with torch.no_grad():
            for batch in ValLoader(data.val, cfg.data.seq_len, cfg.eval.batch_size,
                                   cfg.eval.batches):
                x = batch[:, :-1]
                eos = data.eos_id if cfg.data.document_masking else None
                logits = dense(x, SeqInfo.for_tokens(x, eos))
                losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
        assert rec[f"val_loss_loop{k}"] == pytest.approx(torch.stack(losses).mean().item(),
                                                         abs=1e-5)
    assert rec["val_loss_loop1"] != pytest.approx(rec["val_loss_loop2"], abs=1e-3)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"val/loss_loop1", "val/loss_loop2", "val/loss"} <= set(acc.Tags()["scalars"])
    from neotron.train.evaluate import evaluate_latest

    ev = evaluate_latest(cfg)
    assert ev["loss_loop1"] == pytest.approx(rec["val_loss_loop1"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"eval.per_loop: needs a looped model"):
        load(DEMO / "llama.yaml", ["eval.per_loop=true"])

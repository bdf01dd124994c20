"""Merging Mixture-of-LoRAs experts into plain SwiGLU weights (`neotron convert --merge-mol`).

The reference computes the merge from the definition, sharing no code with
neotron.arch.mol_merge: the router probabilities by its own softmax, the gates by sorting, their
mean g_bar over the calibration tokens, every expert's materialized weights W_j,e = W_j +
(alpha / r) B_j,e A_j,e, and then W1' = sum_e (g_bar_e / sum g_bar) W_1,e (same for W3) and
W2' = sum_e g_bar_e W_2,e. fp64. Then: merging is exact (same logits) when every token sees the
same mix of experts (one expert; identical experts with dense or normalized routing); the
calibration pools every call of a looped FFN (checked against the FFN inputs a hook of the
test captures); the CLI writes a run directory that `neotron eval` and `train.init_from` read,
and reports the validation loss before and after; a run without MoL is a one-line error.
"""

from __future__ import annotations

import json

import pytest
import torch

from neotron.arch import ModelConfig, build_model, materialize
from neotron.arch.lora import MoLFFN
from neotron.arch.mol_merge import (
    calibrate,
    merged_ffn_weights,
    merged_model_config,
    merged_state,
)
from tests.test_mol import DIM, make_mol


def reference_gates(m: MoLFFN, h: torch.Tensor) -> torch.Tensor:
    """The mean over the tokens of h of the gates the MoL FFN `m` applies."""
    E = m.cfg.experts
    x = h.reshape(-1, m.router.shape[1])
    logits = x @ m.router.T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs)
    k = m.cfg.top_k or E
    for t in range(x.shape[0]):
        chosen = sorted(range(E), key=lambda i: -probs[t, i].item())[:k]
        for i in chosen:
            gates[t, i] = probs[t, i]
        if m.cfg.normalize_gates and m.cfg.top_k is not None:
            gates[t] = gates[t] / gates[t].sum()
    return gates.mean(0)


def reference_merge(m: MoLFFN, g_bar: torch.Tensor) -> dict[str, torch.Tensor]:
    E, s = m.cfg.experts, m.cfg.alpha / m.cfg.rank

    def expert_weight(name, e):
        w = getattr(m, name).weight
        if name in m.experts:
            w = w + s * m.experts[name].B[e] @ m.experts[name].A[e]
        return w

    c = g_bar.sum()
    return {"w1": sum(g_bar[e] / c * expert_weight("w1", e) for e in range(E)),
            "w3": sum(g_bar[e] / c * expert_weight("w3", e) for e in range(E)),
            "w2": sum(g_bar[e] * expert_weight("w2", e) for e in range(E))}


CASES = {
    "dense": {},
    "top2": {"top_k": 2},
    "top1_normalized": {"top_k": 1, "normalize_gates": True},
    "w2_only": {"targets": ["w2"]},
    "w1_w3_top3": {"targets": ["w1", "w3"], "top_k": 3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weights_match_the_reference(case):
    m = make_mol(**CASES[case])
    batches = [torch.randn(2, 9, DIM, dtype=torch.float64),
               torch.randn(3, 5, DIM, dtype=torch.float64)]
    g_bar = calibrate(m, batches, lambda b: m(b, None))[""]
    assert g_bar.shape == (1, m.cfg.experts)  # one call per forward
    ref = reference_merge(m, reference_gates(m, torch.cat([b.reshape(-1, DIM) for b in batches])))
    got = merged_ffn_weights(m, g_bar[0])
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-12,
                                   msg=lambda s, n=name: f"{n}: {s}")


MOL = {"type": "mol", "experts": 3, "rank": 2, "alpha": 4.0}


def mol_model(ffn: dict, loops: int = 2) -> torch.nn.Module:
    cfg = ModelConfig.model_validate({
        "vocab_size": 64, "dim": 24, "n_layers": 2, "max_seq_len": 16,
        "recursion": {"loops": loops},
        "blocks": {"attention": {"mixer": {"type": "attention", "n_heads": 2},
                                 "ffn": {**MOL, **ffn}}}})
    m = materialize(build_model(cfg), "cpu", seed=0).double()
    with torch.no_grad():  # B = 0 at init: give the experts and the router something to do
        for key, p in m.named_parameters():
            if ".experts." in key and key.endswith(".B"):
                p.normal_(0, 0.3)
            if key.endswith(".router"):
                p.normal_(0, 1.0)
    return m


def merged_model(m: torch.nn.Module, per_loop: dict) -> torch.nn.Module:
    """The merged model of `m`, from calibrate's per-loop gates pooled over the loops."""
    out = build_model(merged_model_config(m.cfg), "cpu").double()
    out.load_state_dict(merged_state(m, {n: g.mean(0) for n, g in per_loop.items()}),
                        strict=True)
    assert not any(isinstance(x, MoLFFN) for x in out.modules())
    return out


@pytest.mark.parametrize("ffn", [{"experts": 1}, {}, {"top_k": 2, "normalize_gates": True}])
def test_merging_is_exact_when_every_token_sees_the_same_mix(ffn):
    m = mol_model(ffn)
    if m.cfg.blocks["attention"].ffn.experts > 1:  # identical experts: any mix is the same
        with torch.no_grad():
            for key, p in m.named_parameters():
                if ".experts." in key:
                    p.copy_(p[:1].expand_as(p))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    g_bars = calibrate(m, [tokens], m)
    merged = merged_model(m, g_bars)
    torch.testing.assert_close(merged(tokens), m(tokens), rtol=1e-10, atol=1e-10)
    if m.cfg.blocks["attention"].ffn.experts > 1:  # the mix itself is not trivial
        assert all(g.max() - g.min() > 0.01 for g in g_bars.values())
    unequal = mol_model(ffn)  # distinct experts: the merge is an approximation
    if unequal.cfg.blocks["attention"].ffn.experts > 1:
        approx = merged_model(unequal, calibrate(unequal, [tokens], unequal))
        assert not torch.allclose(approx(tokens), unequal(tokens), atol=1e-6)


def test_calibration_pools_every_loop_of_every_ffn():
    m = mol_model({"top_k": 2}, loops=3)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [mod.register_forward_pre_hook(
        lambda mod, args, n=name: inputs.setdefault(n, []).append(args[0].detach().clone()))
        for name, mod in m.named_modules() if isinstance(mod, MoLFFN)]
    batches = [torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (1, 16))]
    g_bars = calibrate(m, batches, m)
    for h in hooks:
        h.remove()
    assert set(g_bars) == {"layers.0.ffn", "layers.1.ffn"}
    for name, seen in inputs.items():
        assert len(seen) == 3 * len(batches)  # 3 loops per forward, in loop order
        mod = m.get_submodule(name)
        assert g_bars[name].shape == (3, 3)
        for k in range(3):
            ref_k = reference_gates(mod, torch.cat([x.reshape(-1, 24) for x in seen[k::3]]))
            torch.testing.assert_close(g_bars[name][k], ref_k, rtol=1e-12, atol=1e-12)
        assert (g_bars[name][0] - g_bars[name][2]).abs().max() > 1e-3  # loops route apart
        ref = reference_merge(mod, reference_gates(mod, torch.cat([x.reshape(-1, 24)
                                                                    for x in seen])))
        got = merged_ffn_weights(mod, g_bars[name].mean(0))
        for proj in ("w1", "w3", "w2"):
            torch.testing.assert_close(got[proj], ref[proj], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the command


def _mol_run(tmp_path, data_dir):
    from neotron.cli import main
    from tests.test_train_e2e import tiny

    run = tmp_path / "mol"
    args = tiny(run, data_dir, "model.recursion.loops=2", "model.blocks.attention.ffn.type=mol",
                "model.blocks.attention.ffn.experts=3", "model.blocks.attention.ffn.top_k=2",
                "train.steps=3", "eval.every=3", "eval.at_start=false", "checkpoint.every=3",
                "eval.per_loop=true")
    assert main(["train", *args]) == 0
    return run, args


def test_convert_merge_mol_writes_a_run_that_eval_and_init_from_read(
        tmp_path, data_dir, fresh_logging, capsys):
    from neotron.cli import main
    from neotron.config import load
    from neotron.train.trainer import Trainer

    run, args = _mol_run(tmp_path, data_dir)
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["convert", str(run), str(out), "--merge-mol", "--calib-batches", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("val loss before merging (MoL experts): ")
    assert lines[1].startswith("val loss after merging (one SwiGLU):   ")
    info = json.loads(lines[-1])
    before, after = info["val_loss_before"], info["val_loss_after"]
    assert lines[0].endswith(f"{before:.4f}") and lines[1].endswith(f"{after:.4f}")
    assert info["calib_disjoint_from_eval"] and info["calib_batches"] == 2
    assert "val_loss_loop1_after" in info  # the run's eval.per_loop carries over
    assert info["params"][1] < info["params"][0]
    # before = the MoL run's own evaluation; after = `neotron eval` of the merged run
    assert main(["eval", str(run / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(before, abs=1e-6)
    assert main(["eval", str(out / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(after, abs=1e-6)
    merged_cfg = load(out / "config.yaml")
    assert merged_cfg.model.blocks["attention"].ffn.type == "swiglu"
    assert merged_cfg.run_dir == str(out)
    # train.init_from: a recursive SwiGLU model of the same shape starts from the merged weights
    t = Trainer(load(args[0], [*args[1:], f"run_dir={tmp_path / 'child'}",
                               "model.blocks.attention.ffn={type: swiglu}",
                               f"train.init_from={out}"]))
    t.metrics.close()
    t.stop.uninstall()
    from neotron.convert import find_checkpoint, load_model_tensors

    saved = load_model_tensors(find_checkpoint(out)[0])
    for key, v in t.model.state_dict().items():
        torch.testing.assert_close(v, saved[key], rtol=0, atol=0)
    # refusing to overwrite, and a run without MoL: one line each, exit 2
    assert main(["convert", str(run), str(out), "--merge-mol"]) == 2
    assert "is not empty (--force overwrites)" in capsys.readouterr().err


def test_merge_mol_of_a_run_without_mol_is_a_one_line_error(trained_run, tmp_path,
                                                             fresh_logging, capsys):
    from neotron.cli import main

    assert main(["convert", str(trained_run), str(tmp_path / "out"), "--merge-mol"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neotron: --merge-mol: ") and \
        "has no Mixture-of-LoRAs FFN" in err[0], err
    assert not (tmp_path / "out").exists()

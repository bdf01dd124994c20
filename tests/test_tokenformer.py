"""TokenFormer's Pattention against its formula; growth with zero keys keeps the function
exactly (norm_n frozen) or changes it as predicted (norm_n = n); `neotron grow` end to end:
the grown checkpoint's eval loss equals the parent's, and training continues from it."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from neotron.arch import build_model, materialize
from neotron.arch.linear import make_linear
from neotron.arch.tokenformer import Pattention, PattentionConfig, pattention_norm
from neotron.cli import main as cli_main
from neotron.grow import _grow_tensor
from tests.conftest import ROOT, run_cli

F64 = torch.float64


def layer(n, d_in=6, d_out=5, norm="l2_norm_gelu", norm_n=None, seed=0) -> Pattention:
    p = make_linear(d_in, d_out, PattentionConfig(n_tokens=n, norm=norm, norm_n=norm_n)).to(F64)
    torch.manual_seed(seed)
    p.init_weights(0.5)
    return p


def formula(x, keys, values, norm, n):
    """The TokenFormer paper / official code, written out."""
    a = x @ keys.T
    if norm == "l2_norm_gelu":
        theta = F.gelu(a * math.sqrt(n) / a.norm(dim=-1, keepdim=True))
    elif norm == "gelu_l2_norm":
        g = F.gelu(a)
        theta = g * math.sqrt(n) / g.norm(dim=-1, keepdim=True)
    else:
        theta = torch.exp(a) / torch.exp(a).sum(-1, keepdim=True) * n
    return theta @ values


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_pattention_matches_formula(norm):
    p = layer(9, norm=norm)
    x = torch.randn(3, 4, 6, dtype=F64, requires_grad=True)
    y = p(x)
    ref = formula(x, p.keys, p.values, norm, 9)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(y.square().sum(), [x, p.keys, p.values])
    gb = torch.autograd.grad(ref.square().sum(), [x, p.keys, p.values])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_theta_is_row_scale_invariant_and_has_no_inv_sqrt_d():
    a = torch.randn(4, 7, dtype=F64)
    torch.testing.assert_close(pattention_norm(a * 3.7, "l2_norm_gelu", 7),
                               pattention_norm(a, "l2_norm_gelu", 7).to(F64))
    p = layer(8, d_in=64)
    x = torch.randn(2, 64, dtype=F64)
    a = x @ p.keys.T  # scale 1, not 1/sqrt(64)
    expected = F.gelu(a * math.sqrt(8) / a.norm(dim=-1, keepdim=True)) @ p.values
    torch.testing.assert_close(p(x), expected)


def grown_copy(p: Pattention, m: int, norm_n, new_values="random") -> Pattention:
    q = layer(p.n_tokens + m, p.in_features, p.out_features, norm=p.cfg.norm, norm_n=norm_n,
              seed=1)
    with torch.no_grad():
        q.keys[: p.n_tokens] = p.keys
        q.keys[p.n_tokens:] = 0
        q.values[: p.n_tokens] = p.values
        if new_values == "zero":
            q.values[p.n_tokens:] = 0
    return q


def test_zero_key_growth_with_frozen_norm_n_keeps_outputs():
    p = layer(8)
    x = torch.randn(5, 6, dtype=F64)
    q = grown_copy(p, 8, norm_n=8)
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=1e-13)
    # with sqrt(n) following the current n, every output changes as predicted
    r = grown_copy(p, 8, norm_n=None)
    a = x @ p.keys.T
    predicted = F.gelu(a * math.sqrt(16) / a.norm(dim=-1, keepdim=True)) @ p.values
    torch.testing.assert_close(r(x), predicted, rtol=1e-12, atol=1e-12)
    assert (r(x) - p(x)).abs().max() > 1e-2


def test_new_tokens_train_only_if_their_values_are_not_zero():
    p = layer(8)
    x = torch.randn(5, 6, dtype=F64)
    for new_values, trains in (("random", True), ("zero", False)):
        q = grown_copy(p, 4, norm_n=8, new_values=new_values)
        gk, gv = torch.autograd.grad(q(x).square().sum(), [q.keys, q.values])
        assert (gk[8:].abs().max() > 0) == trains  # key grads ~ <g, v_new>
        assert gv[8:].abs().max() == 0  # GeLU(0) = 0: no value grads at the growth point


def test_optimizer_state_growth_pads_rows_and_keeps_counters():
    old, new = torch.Size([3, 4]), torch.Size([5, 4])
    m = torch.arange(12.0).view(3, 4)
    g = _grow_tensor(m, old, new)
    assert g.shape == new and torch.equal(g[:3], m) and (g[3:] == 0).all()
    step = torch.tensor(7.0)
    assert _grow_tensor(step, old, new) == 7.0
    row_stat = torch.ones(3, 1)  # e.g. a per-row second moment
    assert _grow_tensor(row_stat, old, new).shape == (5, 1)


def test_ffn_and_flops():
    from neotron.arch import ModelConfig

    cfg = ModelConfig.model_validate(dict(vocab_size=50, dim=32, n_layers=1,
                                          linear={"type": "pattention", "n_tokens": 16},
                                          blocks={"t": {"ffn": {"type": "pattention"}}}))
    model = build_model(cfg)
    ffn = model.layers[0].ffn.pattention
    assert ffn.n_tokens == 4 * 32 and ffn.keys.shape == (128, 32)
    wq = model.layers[0].mixer.wq
    assert isinstance(wq, Pattention) and wq.n_tokens == 16
    materialize(model, "cpu", seed=0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        wq(x).sum().backward()
    assert counter.get_total_flops() / 15 == wq.flops_per_token(64)  # measured, fwd + bwd


# ---------------------------------------------------------------- neotron grow, end to end


DEMO = str(ROOT / "configs" / "demo" / "tokenformer.yaml")


def tiny(run_dir, data_dir, n_qkv, n_ffn, *extra) -> list[str]:
    return [
        DEMO, f"run_dir={run_dir}", f"data.dir={data_dir}", "data.tokenizer.vocab_size=512",
        "data.seq_len=32", "model.vocab_size=512", "model.dim=32", "model.n_layers=2",
        "model.blocks.tokenformer.mixer.n_heads=2", f"model.linear.n_tokens={n_qkv}",
        f"model.blocks.tokenformer.ffn.n_tokens={n_ffn}",
        "train.global_batch_tokens=256", "train.micro_batch_size=4",
        "optim.schedule.warmup_steps=2", "eval.every=4", "eval.batches=2", "eval.batch_size=4",
        "checkpoint.every=4", "log.every=1", *extra,
    ]


def cli_json(capsys, *args: str) -> tuple[int, dict | None, str]:
    """`neotron ARGS` in this process (grow and eval are quick; a subprocess would spend most
    of its time importing torch): exit code, the JSON line printed, stderr."""
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), err


def test_grow_keeps_eval_loss_and_training_continues(tmp_path, data_dir, capsys):
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent_args = tiny(parent, data_dir, 16, 64, "train.steps=4")
    run_cli("train", *parent_args, check=True)
    target = tiny(child, data_dir, 32, 96, "train.steps=8", "model.linear.norm_n=16",
                  "model.blocks.tokenformer.ffn.norm_n=64")

    # norm_n left to follow n: refused, with the key to set
    code, _, err = cli_json(capsys, "grow", str(parent), "--to",
                            *tiny(child, data_dir, 32, 96, "train.steps=8"))
    assert code == 2 and "norm_n: 16" in err

    code, summary, err = cli_json(capsys, "grow", str(parent), "--to", *target)
    assert code == 0, err
    assert summary["step"] == 4 and len(summary["grown"]) == 2 * 5  # q, k, v, o, ffn x 2
    assert {tuple(g["tokens"]) for g in summary["grown"]} == {(16, 32), (64, 96)}
    meta = json.loads((child / "checkpoints" / "step_00000004" / "meta.json").read_text())
    parent_meta = json.loads((parent / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["data"] == parent_meta["data"] and meta["tokens"] == parent_meta["tokens"]
    assert meta["model_params"] > parent_meta["model_params"]
    assert set(parent_meta) <= set(meta)  # the trainer's fields, plus grown_from
    assert meta["grown_from"]["step"] == 4 and meta["world_size"] == 1

    _, parent_eval, _ = cli_json(capsys, "eval", *parent_args)
    _, child_eval, _ = cli_json(capsys, "eval", *target)
    assert child_eval["step"] == parent_eval["step"] == 4
    assert abs(child_eval["loss"] - parent_eval["loss"]) < 1e-5, (parent_eval, child_eval)

    code, _, err = cli_json(capsys, "grow", str(parent), "--to", *target)
    assert code == 2 and "--force" in err

    # --reset-step: a fresh schedule from step 0; the data position still continues
    reset = tmp_path / "reset"
    code, summary, err = cli_json(
        capsys, "grow", str(parent), "--to",
        *tiny(reset, data_dir, 32, 96, "train.steps=8", "model.linear.norm_n=16",
              "model.blocks.tokenformer.ffn.norm_n=64"), "--reset-step", "--new-values", "zero")
    assert code == 0 and summary["step"] == 0, err
    reset_meta = json.loads((reset / "checkpoints" / "step_00000000" / "meta.json").read_text())
    assert reset_meta["tokens"] == 0 and reset_meta["data"] == parent_meta["data"]

    trained = run_cli("train", *target, check=True)
    assert "resumed from" in trained.stdout and "(step 4)" in trained.stdout
    records = [json.loads(line) for line in (child / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert json.loads(trained.stdout.strip().splitlines()[-1])["step"] == 8



"""Mixture of LoRAs (MoL) against an explicit oracle written from the paper's equation.

The oracle materializes each expert's weights W_j,i = W_j + (alpha / r) B_j,i A_j,i, runs the
SwiGLU FFN of every expert on every token, and combines the outputs per token: the
router-probability-weighted sum (dense routing), or the chosen experts' outputs (top-k,
gate = probability, or renormalized). It shares no code with neotron.arch.lora (its own
softmax, SwiGLU and top-k selection by sorting). fp64, forward and gradients of every
parameter. Also: the Switch load-balancing loss against a hand count, router statistics,
MoL inside a looped stack, and the trainer logging them.
"""

from __future__ import annotations

import math

import pytest
import torch

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.lora import MoLConfig, MoLFFN, collect_aux

DIM, HIDDEN, E, R = 12, 20, 4, 3


def make_mol(**kw) -> MoLFFN:
    ctx = BuildContext(dim=DIM, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.3)
    cfg = MoLConfig(hidden_dim=HIDDEN, experts=E, rank=R, alpha=6.0, **kw)
    m = MoLFFN(ctx, cfg=cfg)
    torch.manual_seed(0)
    m.init_weights()
    m.double()
    with torch.no_grad():  # B = 0 at init: give the experts something to do
        for f in m.experts.values():
            f.B.normal_(0, 0.3)
        m.router.normal_(0, 1.0)
    return m


def oracle(m: MoLFFN, h: torch.Tensor) -> torch.Tensor:
    """sum over the token's experts of gate_i * FFN(h; W + s B_i A_i), one token at a time."""
    cfg, s = m.cfg, m.cfg.alpha / m.cfg.rank
    x = h.reshape(-1, DIM)
    logits = x @ m.router.T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)

    def weight(name, i):
        w = getattr(m, name).weight
        if name in m.experts:
            w = w + s * m.experts[name].B[i] @ m.experts[name].A[i]
        return w

    def expert_ffn(i, xt):
        a = weight("w1", i) @ xt
        return weight("w2", i) @ (a * torch.sigmoid(a) * (weight("w3", i) @ xt))

    outs = []
    for t in range(x.shape[0]):
        p = probs[t]
        if cfg.top_k is None:
            chosen, gates = list(range(E)), p
        else:
            chosen = sorted(range(E), key=lambda i: -p[i].item())[: cfg.top_k]
            gates = torch.zeros_like(p)
            for i in chosen:
                gates = gates + torch.nn.functional.one_hot(torch.tensor(i), E).double() * p[i]
            if cfg.normalize_gates:
                gates = gates / gates.sum()
        outs.append(sum(gates[i] * expert_ffn(i, x[t]) for i in chosen))
    return torch.stack(outs).reshape(h.shape)


CASES = {
    "dense": {},
    "top1": {"top_k": 1},
    "top1_normalized": {"top_k": 1, "normalize_gates": True},
    "top2_normalized": {"top_k": 2, "normalize_gates": True},
    "dense_w2_only": {"targets": ["w2"]},
    "top2_w1_w3": {"top_k": 2, "targets": ["w1", "w3"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_mol_equals_explicit_sum_over_materialized_experts(case):
    m = make_mol(**CASES[case])
    h = torch.randn(2, 7, DIM, dtype=torch.float64)
    seq = SeqInfo(positions=torch.arange(7))
    out, ref = m(h, seq), oracle(m, h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [p for p in m.parameters()]
    g_out = torch.autograd.grad((out * torch.cos(ref.detach())).sum(), params,
                                allow_unused=True)
    g_ref = torch.autograd.grad((ref * torch.cos(ref.detach())).sum(), params,
                                allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), g_out, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda s, n=name: n)


def test_at_init_mol_is_the_plain_ffn_times_the_gate_sum():
    ctx = BuildContext(dim=DIM, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.3)
    m = MoLFFN(ctx, cfg=MoLConfig(hidden_dim=HIDDEN, experts=E, rank=R)).double()
    m.init_weights()
    h = torch.randn(5, DIM, dtype=torch.float64)
    a = h @ m.w1.weight.T
    plain = (a * torch.sigmoid(a) * (h @ m.w3.weight.T)) @ m.w2.weight.T
    torch.testing.assert_close(m(h, SeqInfo(positions=torch.arange(5))), plain)


def test_balance_loss_and_router_statistics_by_hand():
    m = make_mol(top_k=2, aux_loss_coef=0.5)
    x = torch.randn(3, 8, DIM, dtype=torch.float64)
    m(x, SeqInfo(positions=torch.arange(8)))
    m(x * 0.5, SeqInfo(positions=torch.arange(8)))  # a second call (another loop) adds up
    aux, stats = collect_aux(m)
    want, loads, ents = 0.0, [], []
    for xx in (x, x * 0.5):
        p = torch.softmax(xx.reshape(-1, DIM) @ m.router.T, -1)
        top = p.argsort(-1, descending=True)[:, :2]
        f = torch.stack([(top == i).any(-1).double().mean() / 2 for i in range(E)])
        want += 0.5 * E * (f * p.mean(0)).sum()
        loads.append(f)
        ents.append(-(p * p.log()).sum(-1).mean())
    torch.testing.assert_close(aux.double(), want.double(), rtol=1e-5, atol=1e-7)
    assert aux.requires_grad
    load = torch.stack(loads).mean(0)
    for i in range(E):
        assert stats[f"mol_load_{i}"].item() == pytest.approx(load[i].item(), abs=1e-6)
    assert stats["mol_entropy"].item() == pytest.approx(torch.stack(ents).mean().item(), rel=1e-5)
    assert stats["mol_load_max"].item() == pytest.approx(load.max().item() * E, rel=1e-6)
    assert collect_aux(m) == (None, {})  # collected once
    with torch.no_grad():  # evaluation records nothing
        m(x, SeqInfo(positions=torch.arange(8)))
    assert collect_aux(m) == (None, {})


def test_uniform_router_gives_balance_loss_one_and_max_entropy():
    m = make_mol(aux_loss_coef=1.0)
    with torch.no_grad():
        m.router.zero_()
    m(torch.randn(4, 6, DIM, dtype=torch.float64), SeqInfo(positions=torch.arange(6)))
    aux, stats = collect_aux(m)
    assert aux.item() == pytest.approx(1.0)
    assert stats["mol_entropy"].item() == pytest.approx(math.log(E))


def test_mol_in_a_looped_model_records_every_call_and_trains(tmp_path, data_dir,
                                                            fresh_logging):
    from neotron.cli import main
    from tests.test_train_e2e import records, tiny

    run = tmp_path / "mol"
    args = tiny(run, data_dir, "model.recursion.loops=3", "model.blocks.attention.ffn.type=mol",
                "model.blocks.attention.ffn.experts=3", "model.blocks.attention.ffn.top_k=1",
                "train.steps=3", "eval.every=3", "checkpoint.every=0")
    assert main(["train", *args]) == 0
    recs = [r for r in records(run) if "loss" in r]
    assert len(recs) == 3
    for r in recs:
        loads = [r[f"mol_load_{i}"] for i in range(3)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        # coefficient 0.01 per call, 2 layers x 3 loops = 6 calls, each at most 0.01 E
        assert 0 < r["mol_aux_loss"] <= 6 * 0.01 * 3
        assert 0 < r["mol_entropy"] <= math.log(3) + 1e-6


@pytest.mark.parametrize("rung", ["20m", "60m", "125m", "350m", "760m", "1.3b"])
def test_recursive_mol_ladder_matches_llama_in_unique_params_and_tokens(rung):
    from neotron.arch import build_model
    from neotron.config import load
    from tests.conftest import ROOT

    llama = load(ROOT / f"configs/scaling/llama/{rung}.yaml")
    cfg = load(ROOT / f"configs/scaling/recursive_mol/{rung}.yaml")
    assert cfg.model.recursion.loops == 2 and cfg.model.blocks["attention"].ffn.type == "mol"
    assert (cfg.model.dim, cfg.model.n_layers) == (llama.model.dim, llama.model.n_layers)
    n, ln = build_model(cfg.model).num_params(), build_model(llama.model).num_params()
    assert abs(n - ln) / ln < 0.01
    assert cfg.train.steps * cfg.train.global_batch_tokens == \
        llama.train.steps * llama.train.global_batch_tokens

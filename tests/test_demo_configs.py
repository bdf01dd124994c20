"""Every demo config (whatever blocks it uses) builds, and one optimizer step on random tokens
gives finite gradients and parameters; each also has to train in the end-to-end tests."""

import math

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import build_model, materialize
from neotron.arch.context import SeqInfo
from neotron.config import load
from neotron.optim.builder import build_optimizer
from tests.conftest import ROOT

DEMOS = sorted(p.stem for p in (ROOT / "configs" / "demo").glob("*.yaml"))


def test_the_demo_set_is_complete():
    expected = {"llama", "deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp", "hybrid",
                "memoryformer", "memory", "tokenformer"}
    assert expected <= set(DEMOS)


@pytest.mark.parametrize("name", DEMOS)
def test_demo_config_builds_and_takes_a_finite_step(name):
    cfg = load(ROOT / "configs" / "demo" / f"{name}.yaml")
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    opt = build_optimizer(model, cfg.optim)
    tokens = torch.randint(1, cfg.model.vocab_size, (2, 33))
    tokens[0, 10] = 0  # an EOS inside a row: exercises document masking where it is on
    inputs = tokens[:, :-1]
    eos = 0 if cfg.data.document_masking else None
    logits = model(inputs, SeqInfo.for_tokens(inputs, eos))
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(cfg.model.vocab_size)) < 1.5  # a sane initialization
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n

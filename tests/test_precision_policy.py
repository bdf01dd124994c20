"""The precision policy: `model.linear` quantizes every block projection, and
`model.linear_exclude` keeps the projections its globs name dense (state_dict names).

Checked: which module each projection becomes; that excluding every projection gives exactly
the dense model (same parameters, same initialization, same logits); that a typo is a one-line
config error; and that exclusions compose with per-depth LoRA (whose hooks must sit on the
projection that is actually used)."""

import pytest
import torch

from neotron.arch import build_model, materialize
from neotron.arch.linear import DenseLinear
from neotron.arch.quant import BitLinear
from neotron.config import load
from neotron.errors import ConfigError
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo"
SMALL = ["model.dim=32", "model.n_layers=3", "model.vocab_size=300", "data.tokenizer.vocab_size=300",
         "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1"]


def model_for(*overrides: str, config: str = "bitnet.yaml"):
    cfg = load(DEMO / config, [*SMALL, *overrides])
    return materialize(build_model(cfg.model), "cpu", 0), cfg


def kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, DenseLinear) and n.startswith("layers.")}


def test_globs_choose_the_dense_projections():
    model, _ = model_for("model.linear_exclude=['layers.*.mixer.wo', 'layers.0.*']")
    got = kinds(model)
    for name, kind in got.items():
        dense = name.startswith("layers.0.") or name.endswith("mixer.wo")
        assert kind == ("DenseLinear" if dense else "BitLinear"), name
    assert sum(k == "BitLinear" for k in got.values()) == 2 * 6  # layers 1-2: wq wk wv w1 w2 w3
    x = torch.randint(0, 300, (2, 7))
    model(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_excluding_everything_is_the_dense_model():
    quant, _ = model_for("model.linear_exclude=['layers.*']")
    dense, _ = model_for(config="llama.yaml")
    assert not any(isinstance(m, BitLinear) for m in quant.modules())
    sd_q, sd_d = quant.state_dict(), dense.state_dict()
    assert sd_q.keys() == sd_d.keys()
    for k in sd_d:
        assert torch.equal(sd_q[k], sd_d[k]), k
    x = torch.randint(0, 300, (2, 7))
    assert torch.equal(quant(x), dense(x))


def test_a_glob_that_matches_nothing_is_a_config_error():
    cfg = load(DEMO / "bitnet.yaml", [*SMALL, "model.linear_exclude=['layers.*.mixer.w_o']"])
    with pytest.raises(ConfigError, match=r"model.linear_exclude.0: 'layers.\*.mixer.w_o'"):
        build_model(cfg.model)


def test_exclusion_composes_with_per_depth_lora():
    model, _ = model_for("model.linear_exclude=['layers.*.mixer.wq']",
                         "model.linear={type: bitnet}", config="relaxed_recursive.yaml")
    wq = model.layers[0].mixer.wq
    assert type(wq) is DenseLinear and wq._forward_hooks  # the LoRA hook is on the live module
    assert isinstance(model.layers[0].mixer.wk, BitLinear)
    x = torch.randint(0, 300, (2, 7))
    model(x).square().mean().backward()

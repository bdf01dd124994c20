"""`train.init_from`: a run starts from another run's model weights and nothing else.

Compared: the new run's weights with the parent checkpoint's tensors (read independently with
safetensors after `neotron convert`), and its step, tokens, data position and optimizer state
with a fresh run's. Also: a dense parent into a BitNet model (the extra norms keep their fresh
init), a mismatch as one ConfigError line and exit 2, and resume winning over init_from.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from neotron.config import load
from neotron.errors import ConfigError
from tests.test_train_e2e import tiny


def _trainer(*args: str):
    from neotron.train.trainer import Trainer

    cfg = load(args[0], list(args[1:]))
    return Trainer(cfg)


def _close(trainer) -> None:
    trainer.metrics.close()
    trainer.stop.uninstall()


def _parent_tensors(run, tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from neotron.convert import convert

    convert(run, tmp_path / "parent")
    return load_file(str(tmp_path / "parent" / "model.safetensors"))


def test_init_from_loads_weights_and_nothing_else(trained_run, data_dir, tmp_path):
    parent = _parent_tensors(trained_run, tmp_path)
    t = _trainer(*tiny(tmp_path / "child", data_dir, f"train.init_from={trained_run}"))
    try:
        state = t.model.state_dict()
        assert set(state) == set(parent)
        for k, v in parent.items():
            assert torch.equal(state[k], v), k
        fresh = _trainer(*tiny(tmp_path / "fresh", data_dir))
        _close(fresh)
        assert not torch.equal(fresh.model.state_dict()["embed.weight"], parent["embed.weight"])
        assert (t.step, t.tokens, t.resumed_from) == (0, 0, None)
        assert t.loader.state_dict() == fresh.loader.state_dict()
        assert t.loader.state_dict()["consumed"] == 0
        assert all(not s for s in t.optimizer.state.values())
        assert t._set_lr() == fresh._set_lr()  # the schedule starts at step 0 again
    finally:
        _close(t)


def test_dense_parent_into_bitnet_keeps_the_new_norms_fresh(trained_run, data_dir, tmp_path):
    from neotron.arch.quant import BitLinear

    parent = _parent_tensors(trained_run, tmp_path)
    t = _trainer(*tiny(tmp_path / "child", data_dir, f"train.init_from={trained_run}",
                       "model.linear.type=bitnet", "model.linear.ramp_steps=4"))
    try:
        state = t.model.state_dict()
        for k, v in parent.items():
            assert torch.equal(state[k], v), k
        norms = [m.norm.weight for m in t.model.modules() if isinstance(m, BitLinear)]
        assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
    finally:
        _close(t)


def test_mismatch_is_one_config_error_line(trained_run, data_dir, tmp_path, capsys):
    from neotron.cli import main

    with pytest.raises(ConfigError, match=r"train\.init_from: .* shape mismatch: embed\.weight"):
        _trainer(*tiny(tmp_path / "a", data_dir, f"train.init_from={trained_run}",
                       "model.dim=64"))
    with pytest.raises(ConfigError, match="missing from it: layers.2"):
        _trainer(*tiny(tmp_path / "b", data_dir, f"train.init_from={trained_run}",
                       "model.n_layers=3"))
    with pytest.raises(ConfigError, match="does not have: head.weight"):
        # a tied model cannot take an untied parent's separate head
        untied = tmp_path / "untied"
        assert main(["train", *tiny(untied, data_dir, "train.steps=1", "eval.every=0",
                                    "eval.at_start=false", "model.tie_embeddings=false")]) == 0
        _trainer(*tiny(tmp_path / "c", data_dir, f"train.init_from={untied}"))
    capsys.readouterr()
    assert main(["train", *tiny(tmp_path / "d", data_dir, "train.init_from=/nonexistent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neotron: train.init_from: no complete checkpoint found") and \
        "\n" not in err


def test_resume_wins_over_init_from(trained_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    other = tmp_path / "other"
    t = _trainer(*tiny(run, data_dir, f"train.init_from={other}"))  # other does not even exist
    try:
        assert t.resumed_from is not None and t.step == 4
    finally:
        _close(t)


def test_fine_tune_with_a_ramp_trains_end_to_end(trained_run, data_dir, tmp_path):
    from neotron.arch.quant import BitLinear
    from tests.test_train_e2e import records

    run = tmp_path / "ft"
    t = _trainer(*tiny(run, data_dir, f"train.init_from={trained_run}",
                       "model.linear.type=bitnet", "model.linear.ramp_steps=12",
                       "model.linear.ramp=layerwise", "train.steps=6", "eval.every=3"))
    t.run()
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # the trainer set lam for the last step (index 5): layer 0 ramps over steps [0, 6), layer 1
    # over [6, 12)
    lams = {n.split(".")[1]: m.quant_lambda.item() for n, m in t.model.named_modules()
            if isinstance(m, BitLinear)}
    assert lams == {"0": pytest.approx(5 / 6), "1": 0.0}

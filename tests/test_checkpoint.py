"""Checkpoint contract: atomic directories, `latest`, pruning, safe loading."""

import os
import pickle

import pytest
import torch

from neotron.train.checkpoint import Checkpointer, step_dir_name
from neotron.train.safe_reader import CheckpointError


def model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    return model, opt


def train_steps(model, opt, n: int):
    for _ in range(n):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_roundtrip_model_optimizer_rng_and_meta(tmp_path):
    model, opt = model_and_opt(0)
    train_steps(model, opt, 3)
    ck = Checkpointer(tmp_path, keep_last=2)
    rng_before = torch.get_rng_state()
    path = ck.save(3, model, opt, {"tokens": 99, "data": {"consumed": 12}})
    expected_next = torch.rand(3)
    assert path.name == step_dir_name(3) and ck.latest() == path

    model2, opt2 = model_and_opt(1)
    torch.manual_seed(1234)
    meta = ck.load(path, model2, opt2)
    assert meta["step"] == 3 and meta["tokens"] == 99 and meta["data"] == {"consumed": 12}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and a["step"] == b["step"]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(torch.rand(3), expected_next)
    # and the next step is identical
    torch.manual_seed(5)
    train_steps(model, opt, 1)
    torch.manual_seed(5)
    train_steps(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_prunes_and_latest_follows(tmp_path):
    model, opt = model_and_opt(0)
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        train_steps(model, opt, 1)
        ck.save(step, model, opt, {"tokens": step})
    assert [p.name for p in ck.complete_steps()] == [step_dir_name(3), step_dir_name(4)]
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(4)


def test_incomplete_checkpoint_is_never_latest(tmp_path):
    model, opt = model_and_opt(0)
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, model, opt, {"tokens": 1})
    # a crash mid-save leaves a temp dir and maybe a step dir without meta.json
    (tmp_path / f".tmp-{step_dir_name(2)}").mkdir()
    (tmp_path / step_dir_name(3)).mkdir()
    (tmp_path / step_dir_name(3) / ".metadata").write_bytes(b"partial")
    assert ck.latest().name == step_dir_name(1)
    os.remove(tmp_path / "latest")  # even without the pointer
    assert ck.latest().name == step_dir_name(1)
    ck.save(4, model, opt, {"tokens": 4})
    assert not list(tmp_path.glob(".tmp-*"))  # stale temp dirs are cleaned by the next save


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_refuses_arbitrary_pickles(tmp_path):
    model, opt = model_and_opt(0)
    ck = Checkpointer(tmp_path, keep_last=2)
    path = ck.save(1, model, opt, {"tokens": 1})
    with open(path / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError, match="refusing"):
        ck.load(path, model, opt)
    assert not (tmp_path / "pwned").exists()

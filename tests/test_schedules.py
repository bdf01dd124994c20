import math

import pytest

from neotron.config import ScheduleConfig
from neotron.optim.schedules import lr_multiplier


def test_cosine_warmup_peak_and_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, cfg) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_multiplier(int(mid), 100, cfg) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    values = [lr_multiplier(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd_is_flat_then_cools_down(shape):
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, decay_shape=shape,
                         min_lr_ratio=0.0)
    assert [lr_multiplier(s, 100, cfg) for s in range(5, 80)] == [1.0] * 75
    cool = [lr_multiplier(s, 100, cfg) for s in range(80, 100)]
    assert all(a > b for a, b in zip(cool, cool[1:]))
    assert cool[-1] == pytest.approx(0.0)
    if shape == "1-sqrt":
        assert cool[9] == pytest.approx(1 - math.sqrt(10 / 20))


def test_constant():
    cfg = ScheduleConfig(name="constant", warmup_steps=2)
    assert [lr_multiplier(s, 10, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_lr_ramp_factor_goes_linearly_then_holds():
    from neotron.optim.schedules import ramp_factor

    ramp = (4.0, 1.0, 0.5)  # 4x -> 1x over the first half of 100 steps
    assert ramp_factor(0, 100, ramp) == 1.0
    assert ramp_factor(25, 100, ramp) * 4.0 == pytest.approx(2.5)
    assert ramp_factor(50, 100, ramp) * 4.0 == pytest.approx(1.0)
    assert ramp_factor(99, 100, ramp) * 4.0 == pytest.approx(1.0)


def test_a_block_lr_ramp_becomes_its_own_group_and_the_trainer_applies_it():
    """A module's `_neotron_lr_scale` ramp (start, end, fraction) -> its own param group named
    after it, starting at start x lr; the trainer's per-step lr then follows the ramp times the
    schedule (checked here by the arithmetic of the ramp's definition, not ramp_factor)."""
    import types

    from torch import nn

    from neotron.config import OptimConfig
    from neotron.optim.builder import build_optimizer
    from neotron.train.trainer import Trainer

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.values = nn.Parameter(torch.zeros(8, 4))
            self._neotron_lr_scale = {"values": (4.0, 1.0, 0.5)}

    import torch

    model = nn.Sequential(nn.Linear(4, 4), Table())
    cfg = OptimConfig(name="adamw", lr=1e-3,
                      schedule=ScheduleConfig(name="constant", warmup_steps=0))
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    ramped = [n for n in groups if n.endswith("_lr4to1x")]
    assert len(ramped) == 1, list(groups)
    assert groups[ramped[0]]["base_lr"] == pytest.approx(4e-3)
    fake = types.SimpleNamespace(optimizer=opt, step=0, cfg=types.SimpleNamespace(
        train=types.SimpleNamespace(steps=100), optim=cfg))
    for step, want in ((0, 4e-3), (10, (4 - 3 * 10 / 50) * 1e-3), (60, 1e-3)):
        fake.step = step
        Trainer._set_lr(fake)
        assert groups[ramped[0]]["lr"] == pytest.approx(want)
        others = [g["lr"] for n, g in groups.items() if n != ramped[0]]
        assert others and all(lr == pytest.approx(1e-3) for lr in others)

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

"""Learning-rate schedules as pure functions of the step, so a resumed run needs no
scheduler state beyond the step it saved."""

from __future__ import annotations

import math

from neotron.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate for the update taken at `step` (0-based).

    cosine: linear warmup, then cosine from 1 to min_lr_ratio at the last step.
    wsd: linear warmup, constant, then a cooldown over the last `decay_fraction` of the steps
         to min_lr_ratio (Hägele et al., arXiv 2405.18392; "1-sqrt" is their best shape).
    constant: linear warmup, then 1.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.name == "cosine":
        span = max(1, total_steps - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if cfg.decay_shape == "linear":
        shape = 1 - progress
    elif cfg.decay_shape == "1-sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * shape


def ramp_factor(step: int, total_steps: int, ramp: tuple[float, float, float]) -> float:
    """A group's lr multiplier at `step` relative to its start value: `ramp` = (start, end,
    fraction) goes linearly from start (step 0) to end (at `fraction` of the run's steps), then
    stays at end. UltraMemV2's value lr goes 4 -> 1 this way (release:
    `mem_value_lr_max_steps_rate`)."""
    start, end, fraction = ramp
    span = max(1.0, fraction * total_steps)
    progress = min(1.0, step / span)
    return (start + (end - start) * progress) / start

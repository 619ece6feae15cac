"""Learning-rate schedules as one pure function of (update index, config).

``lr_at(step, cfg)`` is the learning rate of update ``step`` (0-based, so a run uses steps
0 .. cfg.steps - 1). Being a pure function of the step, the schedule needs no state in checkpoints.

- warmup (all schedules): update i < warmup_steps uses lr * (i + 1) / warmup_steps, so the first
  update is never at zero and update warmup_steps - 1 reaches the peak;
- "constant": the peak after warmup;
- "cosine": half a cosine from the peak (first update after warmup) down to lr * min_lr_ratio,
  reached exactly at the last update;
- "wsd" (warmup-stable-decay): the peak until the last ``cfg.decay_steps`` updates, which fall
  linearly to lr * min_lr_ratio: decay update j = 1 .. n uses peak - j/n * (peak - min), so the
  last update is at the minimum. Checkpoints of the stable phase can branch into a decay later.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"lr_at: step={step!r} is not allowed: expected a non-negative integer")
    step = min(step, cfg.steps - 1)  # past the end, hold the final value
    peak = cfg.lr
    low = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / span
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - cfg.decay_steps
        if step < decay_start:
            return peak
        progress = (step - decay_start + 1) / cfg.decay_steps
        return peak - progress * (peak - low)
    raise ValueError(f"lr_at: schedule={cfg.schedule!r} is not known")  # unreachable: the config validates it

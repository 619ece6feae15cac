"""Samplers: the multistep consistency sampler (1, 2, 4 ... steps) and the teacher's ODE sampler,
both with per-sample random generators so a sample depends on its seed only, never on the batch.

Consistency sampler (Song et al. 2023; sCM App. G): x = sigma_d z at t_max = arctan(sigma_max / sigma_d),
x0 = f(x, t_max); then for each intermediate time t_i: x = cos t_i x0 + sin t_i sigma_d z_i (fresh
noise), x0 = f(x, t_i). Default intermediate times: 2 steps [1.1] (sCM), 4 steps [1.3, 1.0, 0.6] (rCM
paper), 3 steps [1.3, 1.0]; any list can be given.
"""

from __future__ import annotations

import math

import torch

from ..core.seed import per_sample_generators
from ..models.denoiser import sample_ode
from .trigflow import HALF_PI, consistency_fn

DEFAULT_MID_TIMES = {1: (), 2: (1.1,), 3: (1.3, 1.0), 4: (1.3, 1.0, 0.6)}


def t_max_for(sigma_max: float, sigma_d: float) -> float:
    """arctan(sigma_max / sigma_d): sCM's start time (sigma_max = 80 gives 1.5645 for sigma_d = 0.5)."""
    if not sigma_max > 0:
        raise ValueError(f"sigma_max={sigma_max} must be > 0")
    return math.atan(sigma_max / sigma_d)


def mid_times_for(steps: int, mid_times=None) -> tuple[float, ...]:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if mid_times is None:
        if steps not in DEFAULT_MID_TIMES:
            raise ValueError(f"no default intermediate times for {steps} steps; pass mid_times (len {steps - 1})")
        return DEFAULT_MID_TIMES[steps]
    mid = tuple(float(m) for m in mid_times)
    if len(mid) != steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} intermediate times; got {len(mid)}")
    if any(not 0 < m <= HALF_PI for m in mid):
        raise ValueError(f"intermediate times {mid} must lie in (0, pi/2]")
    return mid


def per_sample_noise(seeds, shape: tuple[int, ...], draws: int, device="cpu") -> list[torch.Tensor]:
    """``draws`` standard-normal tensors [N, *shape]; sample i's draws come in order from its own
    generator seeded with seeds[i], so they do not depend on which other samples share the batch."""
    gens = per_sample_generators(list(seeds))
    per = [[torch.randn(shape, generator=g) for _ in range(draws)] for g in gens]
    return [torch.stack([p[d] for p in per]).to(device) for d in range(draws)]


@torch.no_grad()
def consistency_sample(student, noise: list[torch.Tensor] | torch.Tensor, y: torch.Tensor | None = None,
                       steps: int = 1, mid_times=None, t_max: float | None = None,
                       sigma_max: float = 80.0) -> torch.Tensor:
    """Multistep consistency sampling. ``noise``: a list of at least ``steps`` standard-normal tensors
    (the first starts the chain, the others re-noise), e.g. from ``per_sample_noise``."""
    if isinstance(noise, torch.Tensor):
        noise = [noise]
    mid = mid_times_for(steps, mid_times)
    if len(noise) < steps:
        raise ValueError(f"{steps} steps need {steps} noise draws; got {len(noise)}")
    t0 = t_max if t_max is not None else t_max_for(sigma_max, student.sigma_d)
    if not 0 < t0 <= HALF_PI:
        raise ValueError(f"t_max={t0} must lie in (0, pi/2]")
    n = noise[0].shape[0]
    x = student.sigma_d * noise[0]
    x0 = consistency_fn(student, x, torch.full((n,), t0, device=x.device), y, role="student")
    for i, t_i in enumerate(mid):
        x = math.cos(t_i) * x0 + math.sin(t_i) * student.sigma_d * noise[i + 1]
        x0 = consistency_fn(student, x, torch.full((n,), t_i, device=x.device), y, role="student")
    return x0


@torch.no_grad()
def teacher_sample(teacher, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = 50,
                   guidance_scale: float = 1.0, solver: str = "ddim", t_max: float = HALF_PI) -> torch.Tensor:
    """The teacher's deterministic multistep ODE sampler (``fewer.models.denoiser.sample_ode``)."""
    return sample_ode(teacher, noise, y, steps=steps, guidance_scale=guidance_scale, solver=solver, t_max=t_max)

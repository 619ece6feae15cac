"""Distribution matching (DMD/DMD2, as rCM uses it): student rollouts, the fake-score network's
flow-matching loss, and the generator loss whose gradient is (f_fake - f_teacher) / mean|x0 - f_teacher|.

Rollout ("backward simulation", rCM): start at t_1 = t_max from pure noise; alternate student denoise
and re-noise with fresh noise for N steps, t_n = min(t_hat_n, t_{n-1}) with t_hat_n from the DMD time
proposal p_D; only the LAST denoising step carries gradient. N is drawn from 1..max_rollout (or given).

Generator loss (rCM eq., DMD2 normaliser): x0 from the rollout, t_D ~ p_D, x = cos t_D x0 + sin t_D eps,
f_fake = the fake score's consistency function (conditional, no CFG), f_teach = the teacher's (with CFG),
both without gradient; grad = (f_fake - f_teach) / max(mean|x0 - f_teach|, 1e-5) per sample (float64);
loss = sum over elements (x0 - sg[x0 - grad])^2, whose gradient with respect to x0 is 2 grad.
"""

from __future__ import annotations

import math

import torch

from .trigflow import _bcast, call_raw, check_times
from .scm import lognormal_times


def renoise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sigma_d: float) -> torch.Tensor:
    tt = _bcast(t, x0)
    return (torch.cos(tt) * x0.double() + torch.sin(tt) * sigma_d * noise.double()).to(x0.dtype)


def student_x0(student, x_t, t, y):
    """f_theta(x_t, t) with gradient (float64 coefficients)."""
    tt = _bcast(t, x_t)
    F = call_raw(student, x_t, t.to(x_t.dtype), y, role="student")
    return (torch.cos(tt) * x_t.double() - torch.sin(tt) * student.sigma_d * F.double()).to(x_t.dtype)


def rollout(student, shape: tuple[int, ...], y, *, steps: int, t_max: float, p_mean: float, p_std: float,
            generator: torch.Generator | None = None, grad: bool = True, device="cpu",
            fixed_times=None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student samples x0 [shape] from ``steps`` denoise/re-noise rounds; gradient only through the last
    round when ``grad``. Returns (x0, times used [steps, N]). ``fixed_times`` (len steps, descending from
    t_max) replaces the stochastic t_n."""
    n = shape[0]
    sd = student.sigma_d
    if steps < 1:
        raise ValueError(f"rollout steps={steps} must be >= 1")
    if dtype is None:
        first = next(iter(student.parameters()), None) if hasattr(student, "parameters") else None
        dtype = first.dtype if first is not None else torch.float32
    t_cur = torch.full((n,), float(t_max), dtype=torch.float64)
    x = (sd * torch.randn(shape, generator=generator, dtype=dtype)).to(device)
    used = []
    for k in range(steps):
        if k > 0:
            if fixed_times is not None:
                t_hat = torch.full((n,), float(fixed_times[k]), dtype=torch.float64)
            else:
                t_hat = lognormal_times(n, p_mean, p_std, sd, generator)
            t_cur = torch.minimum(t_hat, t_cur)
            x = renoise(x0.detach(), t_cur.to(device), torch.randn(shape, generator=generator, dtype=dtype).to(device), sd)
        used.append(t_cur.clone())
        last = k == steps - 1
        with torch.set_grad_enabled(grad and last):
            x0 = student_x0(student, x, t_cur.to(device), y)
    return x0, torch.stack(used)


def fake_score_loss(fake, x0: torch.Tensor, y, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score on (detached) student samples, per sample: mean over elements
    of (F_fake(x_t, t) - v_t / sigma_d)^2."""
    sd = fake.sigma_d
    t = check_times(t, x0.shape[0]).to(x0.device)
    x0 = x0.detach()
    x_t = renoise(x0, t, noise, sd)
    tt = _bcast(t, x0)
    target = (torch.cos(tt) * noise.double() * sd - torch.sin(tt) * x0.double()) / sd
    F = call_raw(fake, x_t, t.to(x0.dtype), y, role="fake score")
    return (F.double() - target).pow(2).flatten(1).mean(1)


def dmd_gradient(fake, teacher, x0: torch.Tensor, y, t: torch.Tensor, noise: torch.Tensor,
                 guidance_scale: float = 1.0) -> torch.Tensor:
    """(f_fake - f_teacher) / mean|x0 - f_teacher| per sample, float64, no gradient."""
    t = check_times(t, x0.shape[0]).to(x0.device)
    with torch.no_grad():
        x = renoise(x0.detach(), t, noise, fake.sigma_d)
        tt = _bcast(t, x0)
        c, s = torch.cos(tt), torch.sin(tt)
        F_fake = call_raw(fake, x, t.to(x0.dtype), y, role="fake score").double()
        F_teach = call_raw(teacher, x, t.to(x0.dtype), y, guidance_scale, role="teacher").double()
        f_fake = c * x.double() - s * fake.sigma_d * F_fake
        f_teach = c * x.double() - s * teacher.sigma_d * F_teach
        norm = (x0.detach().double() - f_teach).abs().flatten(1).mean(1).clamp_min(1e-5)
        return (f_fake - f_teach) / norm.reshape(-1, *([1] * (x0.dim() - 1)))


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample sum (x0 - sg[x0 - grad])^2: d loss / d x0 = 2 grad."""
    target = (x0.double() - grad).detach()
    return (x0.double() - target).pow(2).flatten(1).sum(1)

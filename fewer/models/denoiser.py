"""The one interface between diffusion networks, losses and samplers: TrigFlow (Lu & Song 2024).

TrigFlow, with data x0, noise z ~ N(0, sigma_d^2 I) and time t in [0, pi/2]:

    x_t = cos(t) x0 + sin(t) z                  (t = 0: data; t = pi/2: pure noise)
    v_t = dx_t/dt = cos(t) z - sin(t) x0        (the velocity, the regression target)
    x0  = cos(t) x_t - sin(t) v_t               (and z = sin(t) x_t + cos(t) v_t): exact inverses

The network F sees unit-variance inputs and predicts unit-variance outputs (EDM preconditioning,
sCM's form): velocity = sigma_d * F(x_t / sigma_d, t, y). Losses and samplers only call
``TrigFlowDenoiser``; they never see the backbone (EDM's denoiser contract). The net must accept
``net(x, t, y)`` and, for guidance, ``net.forward_with_cfg(x, t, y, scale)`` (``fewer.models.DiT`` does).

Noise convention: every ``noise`` argument here is STANDARD normal; the functions scale it by sigma_d.
Draw it with ``fewer.core.randn_per_sample`` so a sample depends on its own seed, not the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from ..core.seed import per_sample_generators, randn_per_sample

HALF_PI = math.pi / 2


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample times [N] against x [N, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def trig_coefficients(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(t), sin(t) computed in float64, cast to like's dtype and shaped to broadcast against it."""
    t64 = _per_sample(torch.as_tensor(t, device=like.device).to(torch.float64), like)
    return torch.cos(t64).to(like.dtype), torch.sin(t64).to(like.dtype)


def noisy_sample(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z (z already scaled by sigma_d)."""
    c, s = trig_coefficients(t, x0)
    return c * x0 + s * z


def velocity_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v_t = cos(t) z - sin(t) x0."""
    c, s = trig_coefficients(t, x0)
    return c * z - s * x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = cos(t) x_t - sin(t) v: one DDIM step from t to 0 (sCM's consistency function)."""
    c, s = trig_coefficients(t, x_t)
    return c * x_t - s * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z = sin(t) x_t + cos(t) v."""
    c, s = trig_coefficients(t, x_t)
    return s * x_t + c * v


class TrigFlowDenoiser(nn.Module):
    """Wraps a network F into the TrigFlow velocity field sigma_d * F(x_t / sigma_d, t, y)."""

    def __init__(self, net: nn.Module, sigma_d: float = 0.5):
        super().__init__()
        if not sigma_d > 0:
            raise ValueError(f"sigma_d={sigma_d} must be > 0 (the data standard deviation)")
        self.net = net
        self.sigma_d = float(sigma_d)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            guidance_scale: float = 1.0) -> torch.Tensor:
        """F(x_t / sigma_d, t, y): the network output, unit scale (guided if guidance_scale != 1)."""
        x_in = x_t / self.sigma_d
        if guidance_scale == 1.0:
            return self.net(x_in, t, y)
        if y is None:
            raise ValueError("guidance_scale != 1 needs labels y (classifier-free guidance)")
        return self.net.forward_with_cfg(x_in, t, y, guidance_scale)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """dx_t/dt of the probability-flow ODE: sigma_d * F(x_t / sigma_d, t, y)."""
        return self.sigma_d * self.raw(x_t, t, y, guidance_scale)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                guidance_scale: float = 1.0) -> torch.Tensor:
        """Estimate of x0: cos(t) x_t - sin(t) * velocity."""
        return x0_from_velocity(x_t, self.velocity(x_t, t, y, guidance_scale), t)

    forward = velocity


# ---------------------------------------------------------------------------------------------
# Time proposals for training: callables (n, generator, device) -> t [n] in (0, pi/2)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogNormalTime:
    """EDM/sCM proposal: sigma = exp(N(p_mean, p_std^2)), t = arctan(sigma / sigma_d).
    sigma is EDM's noise level (sigma = sigma_d tan t). Defaults are EDM's (-1.2, 1.2); sCM used
    (-1.0, 1.4) for consistency training on CIFAR-10 and (-0.8, 1.6) for its ImageNet teachers."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_d: float = 0.5

    def __call__(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        tau = torch.randn(n, generator=generator, device=device, dtype=torch.float64) * self.p_std + self.p_mean
        return torch.atan(torch.exp(tau) / self.sigma_d).float()


@dataclasses.dataclass(frozen=True)
class UniformTime:
    """t uniform in [t_min, t_max] (a plain flow-matching proposal)."""

    t_min: float = 0.0
    t_max: float = HALF_PI

    def __call__(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * u).float()


TimeSampler = Callable[..., torch.Tensor]


def trigflow_loss(denoiser: TrigFlowDenoiser, x0: torch.Tensor, y: torch.Tensor | None = None, *,
                  noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                  time_sampler: TimeSampler | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching (v-prediction) loss, one value per sample: mean over elements of
    (F(x_t / sigma_d, t, y) - v_t / sigma_d)^2, i.e. ||velocity - v_t||^2 / (sigma_d^2 D).

    ``noise`` is standard normal (scaled here by sigma_d) and ``t`` per-sample times; either is drawn
    from ``generator`` when not given, t from ``time_sampler`` (default LogNormalTime(sigma_d=...)).
    Class-dropout for CFG happens inside the DiT in training mode.
    """
    n = x0.shape[0]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
    if t is None:
        sampler = time_sampler or LogNormalTime(sigma_d=denoiser.sigma_d)
        t = sampler(n, generator, x0.device)
    t = t.to(x0.device)
    if t.shape != (n,):
        raise ValueError(f"t must hold one time per sample, shape ({n},); got {tuple(t.shape)}")
    z = denoiser.sigma_d * noise
    x_t = noisy_sample(x0, z, t)
    target = velocity_target(x0, z, t) / denoiser.sigma_d
    prediction = denoiser.raw(x_t, t, y)
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_matching_steps(data, batch_size: int, seed: int, times: TimeSampler):
    """(get_batch, loss_fn) for ``fewer.train.train``: class-conditional TrigFlow flow matching on an
    image set with ``batch(n, step, seed=)``. Images, noise and times are functions of (seed, step) only,
    so a run is reproducible and resumes bit-exactly."""

    def get_batch(step: int, rank: int, world_size: int):
        x0, y = data.batch(batch_size, step, seed=seed)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return x0, y, torch.randn(x0.shape, generator=gen), times(x0.shape[0], gen)

    def loss_fn(model, batch):
        x0, y, noise, t = batch
        return trigflow_loss(model, x0, y, noise=noise, t=t).mean()

    return get_batch, loss_fn


# ---------------------------------------------------------------------------------------------
# Deterministic ODE sampler
# ---------------------------------------------------------------------------------------------

SOLVERS = ("euler", "heun", "ddim")


def time_grid(steps: int, t_max: float = HALF_PI, t_min: float = 0.0) -> torch.Tensor:
    """steps + 1 times, uniform in t, from t_max down to t_min (float64)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if not 0.0 <= t_min < t_max <= HALF_PI:
        raise ValueError(f"need 0 <= t_min < t_max <= pi/2; got t_min={t_min}, t_max={t_max}")
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


@torch.no_grad()
def sample_ode(denoiser: TrigFlowDenoiser, noise: torch.Tensor, y: torch.Tensor | None = None, steps: int = 32,
               guidance_scale: float = 1.0, solver: str = "heun", t_max: float = HALF_PI,
               times: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = velocity from t_max (x = sigma_d * noise) down to 0, deterministically.

    solver: "euler" (x += dt * v), "heun" (EDM's 2nd order; the last step to t = 0 is plain Euler,
    as in EDM, so it costs 2 * steps - 1 network calls), or "ddim" (TrigFlow's exact step for a
    constant network output: x_s = cos(t - s) x_t - sin(t - s) v; sCM App. B.1).
    ``times`` (descending, ending at 0) overrides the uniform grid. Noise is standard normal.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {SOLVERS}")
    grid = time_grid(steps, t_max) if times is None else torch.as_tensor(times, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2 or bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError("times must be a 1-D strictly decreasing sequence of at least 2 values")
    n = noise.shape[0]
    x = noise * denoiser.sigma_d
    for i in range(grid.numel() - 1):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        t_vec = torch.full((n,), t_cur, device=x.device, dtype=torch.float32)
        v = denoiser.velocity(x, t_vec, y, guidance_scale)
        if solver == "ddim":
            x = math.cos(t_cur - t_next) * x - math.sin(t_cur - t_next) * v
            continue
        x_euler = x + (t_next - t_cur) * v
        if solver == "euler" or t_next == 0.0:
            x = x_euler
            continue
        v_next = denoiser.velocity(x_euler, torch.full_like(t_vec, t_next), y, guidance_scale)
        x = x + (t_next - t_cur) * 0.5 * (v + v_next)
    return x


@torch.no_grad()
def sample(denoiser: TrigFlowDenoiser, seeds: list[int] | range, shape: tuple[int, ...],
           y: torch.Tensor | None = None, *, device: torch.device | str = "cpu", **sampler_kwargs) -> torch.Tensor:
    """Sample one image per seed (shape = one sample's shape); sample i depends only on seeds[i]."""
    noise = randn_per_sample(per_sample_generators(seeds, device), tuple(shape), device=device)
    return sample_ode(denoiser, noise, y, **sampler_kwargs)

"""TrigFlow pieces every distillation method shares: time checks, the consistency function, CFG,
and wrappers that put rectified-flow (RF) or EDM teachers on TrigFlow time.

The model interface (the one ``fewer.models.TrigFlowDenoiser`` defines) is an object with
``sigma_d`` and ``raw(x_t, t, y=None, guidance_scale=1.0)`` returning F, the unit-scale velocity:
dx_t/dt = sigma_d * F. Everything here only calls ``raw``; the analytic toy teacher, the RF/EDM
wrappers and fewer's DiT denoisers all follow it, so any of them can be a teacher, a student or a
fake score.

Consistency function (sCM): f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t), one DDIM step to 0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

HALF_PI = math.pi / 2


def check_times(t: torch.Tensor, n: int | None = None, *, name: str = "t", open_low: bool = False,
                open_high: bool = False) -> torch.Tensor:
    """Validate per-sample TrigFlow times: finite, in [0, pi/2] (ends excluded when asked), one per sample."""
    t = torch.as_tensor(t)
    if n is not None and t.shape != (n,):
        raise ValueError(f"{name} must hold one TrigFlow time per sample, shape ({n},); got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values; TrigFlow times must lie in [0, pi/2]")
    lo, hi = float(t.min()), float(t.max())
    # float32 pi/2 rounds up to 1.5707964; accept it as pi/2
    if lo < 0 or (open_low and lo <= 0) or hi > HALF_PI + 1e-6 or (open_high and hi >= HALF_PI - 1e-7):
        bounds = ("(" if open_low else "[") + "0, pi/2" + (")" if open_high else "]")
        raise ValueError(f"{name} outside {bounds}: min {lo:.6g}, max {hi:.6g} (TrigFlow time, pi/2 = pure noise)")
    return t


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float64).reshape(-1, *([1] * (like.dim() - 1)))


def call_raw(model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
             guidance_scale: float = 1.0, *, role: str = "model") -> torch.Tensor:
    """model.raw(...) with the output checked: same shape as x_t, else a ValueError naming the role."""
    out = model.raw(x_t, t, y, guidance_scale) if guidance_scale != 1.0 else model.raw(x_t, t, y)
    if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the {role}'s output has shape {shape} but its input x_t has shape {tuple(x_t.shape)}; "
                         "a TrigFlow model must return F with the input's shape")
    return out


def consistency_fn(model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                   guidance_scale: float = 1.0, *, role: str = "model") -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t, y); coefficients in float64."""
    t = check_times(t, x_t.shape[0])
    F = call_raw(model, x_t, t, y, guidance_scale, role=role)
    tt = _bcast(t, x_t)
    return (torch.cos(tt) * x_t.double() - torch.sin(tt) * model.sigma_d * F.double()).to(x_t.dtype)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# Teacher wrappers: other schedules on TrigFlow time by signal-to-noise matching (float64)
# ---------------------------------------------------------------------------------------------

VelocityFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class _ScheduleWrapper(nn.Module):
    """Shared CFG plumbing: ``y=None`` is the unconditional call of the wrapped model."""

    def __init__(self, model: nn.Module | VelocityFn, sigma_d: float):
        super().__init__()
        if not sigma_d > 0:
            raise ValueError(f"sigma_d={sigma_d} must be > 0")
        self.model = model
        self.sigma_d = float(sigma_d)

    def _velocity64(self, x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            guidance_scale: float = 1.0) -> torch.Tensor:
        t = check_times(t, x_t.shape[0], **self._time_bounds)
        v = self._velocity64(x_t, t, y)
        if guidance_scale != 1.0:
            if y is None:
                raise ValueError("guidance_scale != 1 needs labels y (classifier-free guidance)")
            v = guided(v, self._velocity64(x_t, t, None), guidance_scale)
        return (v / self.sigma_d).to(x_t.dtype)

    def velocity(self, x_t, t, y=None, guidance_scale: float = 1.0):
        return self.sigma_d * self.raw(x_t, t, y, guidance_scale)

    def denoise(self, x_t, t, y=None, guidance_scale: float = 1.0):
        return consistency_fn(self, x_t, t, y, guidance_scale)

    _time_bounds: dict = {}


class RectifiedFlowTeacher(_ScheduleWrapper):
    """A rectified-flow model v_RF(x_s, s, y) on TrigFlow time.

    RF: x_s = (1 - s) x0 + s n with noise n ~ N(0, sigma_d^2 I) and velocity v_RF = n - x0.
    Matching noise-to-signal, s / (1 - s) = tan t, gives s = sin t / (sin t + cos t) and
    x_s = x_t / (cos t + sin t). From x0 = x_s - s v_RF and n = x_s + (1 - s) v_RF the TrigFlow
    velocity is v = cos t n - sin t x0 (no division, so t = 0 and t = pi/2 are fine). float64 inside.
    ``model(x_s, s, y)`` gets x_s and s cast to the input's dtype; scaling s (e.g. 1000 s) is its own business.
    """

    def _velocity64(self, x_t, t, y):
        tt = _bcast(t, x_t)
        c, s_ = torch.cos(tt), torch.sin(tt)
        s_rf = s_ / (s_ + c)
        x_s = x_t.double() / (c + s_)
        v_rf = self.model(x_s.to(x_t.dtype), s_rf.flatten().to(x_t.dtype), y)
        if v_rf.shape != x_t.shape:
            raise ValueError(f"the RF teacher returned shape {tuple(v_rf.shape)} for input {tuple(x_t.shape)}")
        v_rf = v_rf.double()
        x0 = x_s - s_rf * v_rf
        n = x_s + (1 - s_rf) * v_rf
        return c * n - s_ * x0


class EDMTeacher(_ScheduleWrapper):
    """An EDM denoiser D(x_sigma, sigma, y) -> x0 estimate (x_sigma = x0 + sigma n, n ~ N(0, I)) on TrigFlow time.

    sigma = sigma_d tan t and x_sigma = x_t / cos t. Then sigma_d * n_hat = (x_sigma - D) / tan t and
    v = cos t (sigma_d n_hat) - sin t D. Valid only on the open interval (0, pi/2): EDM has no sigma = 0
    or sigma = inf; times at the ends raise ValueError. float64 inside.
    """

    _time_bounds = {"open_low": True, "open_high": True}

    def _velocity64(self, x_t, t, y):
        tt = _bcast(t, x_t)
        c, s_ = torch.cos(tt), torch.sin(tt)
        sigma = self.sigma_d * s_ / c
        x_sigma = x_t.double() / c
        d = self.model(x_sigma.to(x_t.dtype), sigma.flatten().to(x_t.dtype), y)
        if d.shape != x_t.shape:
            raise ValueError(f"the EDM teacher returned shape {tuple(d.shape)} for input {tuple(x_t.shape)}")
        d = d.double()
        return c * c * (x_sigma - d) / s_ - s_ * d


def rf_time(t: torch.Tensor) -> torch.Tensor:
    """TrigFlow t -> RF s = sin t / (sin t + cos t) (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trigflow_time_from_rf(s: torch.Tensor) -> torch.Tensor:
    """RF s in [0, 1] -> TrigFlow t = arctan(s / (1 - s)) (float64; s = 1 gives pi/2)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if bool(((s < 0) | (s > 1)).any()):
        raise ValueError("RF times must lie in [0, 1]")
    return torch.atan2(s, 1 - s)


def edm_sigma(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow t -> EDM sigma = sigma_d tan t (float64)."""
    return sigma_d * torch.tan(torch.as_tensor(t, dtype=torch.float64))


def trigflow_time_from_sigma(sigma, sigma_d: float) -> torch.Tensor:
    """EDM sigma -> TrigFlow t = arctan(sigma / sigma_d) (float64)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / sigma_d)

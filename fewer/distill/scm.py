"""The continuous-time consistency loss (sCM, Lu & Song 2024) with rCM's choices as switches.

For data x0, noise z ~ N(0, sigma_d^2 I) and t from the log-normal proposal, x_t = cos t x0 + sin t z and
dx_t/dt is the teacher's (CFG) velocity. With F- the student's output without gradient (theta^-):

    g = -cos t * a(t) * (sigma_d F- - dx_t/dt) - r cos t sin t x_t - sigma_d [cos t sin t dF-/dt]

where the bracket is ONE forward-mode JVP through the whole student at primal (x_t, t) with tangent
(cos t sin t dx_t/dt, cos t sin t): the products are formed before the network, so nothing of size
1/sin t or 1/cos t ever exists (sCM's rearrangement that avoids fp16/bf16 overflow).
Warm-up r = min(1, step / warmup_steps):

- ``warmup="scm"`` (sCM Alg. 1): a(t) = cos t and r multiplies both the x_t term and the JVP term;
- ``warmup="rcm"`` (rCM code): a(t) = sqrt(1 - r^2 sin^2 t) (cos t at r = 0, cos^2 t at r = 1) and r
  multiplies only the x_t term; the JVP term is never warmed up.

At r = 1 both give g = cos t * df-/dt, the time derivative of the consistency function f along the
probability-flow ODE, times the weighting cos t. g is then divided by sigma_d (F units) and normalised
per sample: "l2" g / (||g||_2 + c) (the rCM code and sCM paper; NOT the rCM paper's typo ||g||^2 + c),
"rms" g / (||g|| / sqrt(D) + c), "clip" clamp(g, -1, 1), or "none". Per-sample loss (float64):

    sum over elements (F_theta - F- - g)^2        [rCM: sum, no adaptive or prior weighting]

Options: ``adaptive`` (sCM's learned log-variance w(t): e^{-w} L / D + w), ``prior_weighting`` (an extra
1 / (sigma_d tan t) outside the normalisation, as FastGen/SANA-Sprint do), ``variant="discrete"``
(the JVP replaced by the finite difference of f- between x_t and one teacher DDIM step to
t - pi/(2N)), ``tangent="fd"`` (central finite differences instead of the JVP, for models torch.func
cannot see through).

NaN guard: samples whose g or F- is not finite are dropped from the loss (their loss is 0), counted
in the returned stats, and logged with a warning (never silent); ``nan_policy="raise"`` raises instead.
JVPs through attention need ``fewer.attention.use_backend("jvp")`` (the Triton JVP kernel on CUDA, the
PyTorch reference on CPU); ``scm_loss`` enters it for you (``jvp_attention=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn

from ..core.config import Config, check_choice, check_positive_int, check_range
from ..models.layers import sincos_1d
from .trigflow import HALF_PI, _bcast, call_raw, check_times

log = logging.getLogger(__name__)

NORMALIZATIONS = ("l2", "rms", "clip", "none")
WARMUPS = ("scm", "rcm")
VARIANTS = ("continuous", "discrete")
TANGENTS = ("jvp", "fd")
NAN_POLICIES = ("skip", "raise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SCMConfig(Config):
    p_mean: float = -0.8            # log-normal proposal on sigma = sigma_d tan t (rCM Cosmos: -0.8, 1.6)
    p_std: float = 1.6
    guidance_scale: float = 1.0     # teacher CFG scale in dx_t/dt
    normalization: str = "l2"
    norm_c: float = 0.1             # c in g / (||g|| + c)
    warmup_steps: int = 0           # H: r = min(1, step / H); 0 = no warm-up
    warmup: str = "rcm"             # "scm" | "rcm" (which terms r scales; see the module doc)
    adaptive: bool = False          # sCM's learned log-variance weighting
    prior_weighting: bool = False   # extra 1 / (sigma_d tan t) outside the normalisation
    variant: str = "continuous"     # "continuous" (JVP tangent) | "discrete" (finite step of the teacher)
    discrete_steps: int = 64        # N of the discrete variant: step pi / (2N)
    tangent: str = "jvp"            # "jvp" (torch.func.jvp) | "fd" (central finite difference, float64)
    fd_eps: float = 1e-4
    nan_policy: str = "skip"        # "skip" (drop, count, log) | "raise"

    def validate(self) -> None:
        check_range(self, "p_std", 0.0, None, low_open=True)
        check_range(self, "p_mean", -10.0, 10.0)
        check_range(self, "guidance_scale", 0.0, None)
        check_choice(self, "normalization", NORMALIZATIONS)
        check_range(self, "norm_c", 0.0, None, low_open=True)
        check_range(self, "warmup_steps", 0, None)
        check_choice(self, "warmup", WARMUPS)
        check_choice(self, "variant", VARIANTS)
        check_positive_int(self, "discrete_steps")
        check_choice(self, "tangent", TANGENTS)
        check_range(self, "fd_eps", 0.0, 0.1, low_open=True)
        check_choice(self, "nan_policy", NAN_POLICIES)


class LogVarHead(nn.Module):
    """sCM's adaptive weight w(t): a linear map of sin-cos features of t (learned with the student)."""

    def __init__(self, freq_dim: int = 32, time_scale: float = 20.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.linear = nn.Linear(freq_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(sincos_1d(self.freq_dim, t * self.time_scale)).squeeze(-1)


def lognormal_times(n: int, p_mean: float, p_std: float, sigma_d: float, generator=None) -> torch.Tensor:
    """t = arctan(exp(N(p_mean, p_std^2)) / sigma_d), float64, clamped into (0, pi/2)."""
    tau = torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean
    return torch.atan(torch.exp(tau) / sigma_d).clamp(1e-6, HALF_PI - 1e-6)


def warmup_ratio(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _jvp_context(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from ..attention import use_backend
    return use_backend("jvp")


def total_derivative_term(student, x_t: torch.Tensor, t: torch.Tensor, y, dxdt: torch.Tensor, *,
                          tangent: str = "jvp", fd_eps: float = 1e-4, jvp_attention: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-(x_t, t), cos t sin t * dF-/dt) without gradient. dF/dt is the total derivative along
    dx/dt; "jvp": one torch.func.jvp with the rearranged tangent (cos t sin t dx/dt, cos t sin t);
    "fd": central difference of F along the same direction (two extra forwards, float64 arithmetic)."""
    n = x_t.shape[0]
    tt = _bcast(t, x_t)
    cs = (torch.cos(tt) * torch.sin(tt))
    t_in = t.to(x_t.dtype)
    with torch.no_grad():
        if tangent == "jvp":
            def fn(x, tau):
                return call_raw(student, x, tau, y, role="student")
            tx = (cs * dxdt.double()).to(x_t.dtype)
            tt_ = cs.flatten().to(x_t.dtype)
            with _jvp_context(jvp_attention):
                F, dF = torch.func.jvp(fn, (x_t, t_in), (tx, tt_))
            return F.detach(), dF.detach()
        F = call_raw(student, x_t, t_in, y, role="student")
        h = fd_eps
        xp = (x_t.double() + h * cs * dxdt.double()).to(x_t.dtype)
        xm = (x_t.double() - h * cs * dxdt.double()).to(x_t.dtype)
        tp = (t.double() + h * cs.flatten()).to(x_t.dtype)
        tm = (t.double() - h * cs.flatten()).to(x_t.dtype)
        Fp = call_raw(student, xp, tp, y, role="student").double()
        Fm = call_raw(student, xm, tm, y, role="student").double()
        return F.detach(), ((Fp - Fm) / (2 * h)).to(x_t.dtype)


def scm_tangent(student, teacher, x_t: torch.Tensor, t: torch.Tensor, y, cfg: SCMConfig, step: int = 0,
                jvp_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g before normalisation, in F units [i.e. divided by sigma_d], F-, dx_t/dt), all without gradient.
    g is float64."""
    n = x_t.shape[0]
    t = check_times(t, n)
    sd = student.sigma_d
    with torch.no_grad():
        dxdt = teacher.sigma_d * call_raw(teacher, x_t, t.to(x_t.dtype), y, cfg.guidance_scale, role="teacher")
    tt = _bcast(t, x_t)
    c, s = torch.cos(tt), torch.sin(tt)
    r = warmup_ratio(step, cfg.warmup_steps)
    if cfg.variant == "discrete":
        return _discrete_tangent(student, x_t, t, y, dxdt, cfg) + (dxdt,)
    F, jvp = total_derivative_term(student, x_t, t, y, dxdt, tangent=cfg.tangent, fd_eps=cfg.fd_eps,
                                   jvp_attention=jvp_attention)
    F64, jvp64, x64, v64 = F.double(), jvp.double(), x_t.double(), dxdt.double()
    if cfg.warmup == "scm":
        g = -c * c * (sd * F64 - v64) - r * (c * s * x64 + sd * jvp64)
    else:
        a = torch.sqrt(1 - (r * s) ** 2)
        g = -c * a * (sd * F64 - v64) - r * c * s * x64 - sd * jvp64
    return g / sd, F, dxdt


def _discrete_tangent(student, x_t, t, y, dxdt, cfg: SCMConfig):
    """g = cos t (f-(x_t, t) - f-(x_t', t')) / (t - t') with x_t' one teacher DDIM step to t' = t - pi/(2N)."""
    delta_nominal = HALF_PI / cfg.discrete_steps
    t_prev = (t.double() - delta_nominal).clamp_min(0.0)
    delta = _bcast(t.double() - t_prev, x_t)
    tt, tp = _bcast(t, x_t), _bcast(t_prev, x_t)
    with torch.no_grad():
        x_prev = torch.cos(delta) * x_t.double() - torch.sin(delta) * dxdt.double()
        F = call_raw(student, x_t, t.to(x_t.dtype), y, role="student")
        F_prev = call_raw(student, x_prev.to(x_t.dtype), t_prev.to(x_t.dtype), y, role="student")
        sd = student.sigma_d
        f_now = torch.cos(tt) * x_t.double() - torch.sin(tt) * sd * F.double()
        f_prev = torch.cos(tp) * x_prev - torch.sin(tp) * sd * F_prev.double()
        g = torch.cos(tt) * (f_now - f_prev) / delta
    return g / sd, F


def normalize_tangent(g: torch.Tensor, method: str = "l2", c: float = 0.1) -> torch.Tensor:
    """Per-sample tangent normalisation (float64): l2 g/(||g||+c), rms g/(||g||/sqrt(D)+c), clip, none."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization={method!r}: choose one of {NORMALIZATIONS}")
    flat = g.flatten(1)
    if method == "none":
        return g
    if method == "clip":
        return g.clamp(-1.0, 1.0)
    norm = flat.norm(dim=1)
    if method == "rms":
        norm = norm / math.sqrt(flat.shape[1])
    return g / (norm + c).reshape(-1, *([1] * (g.dim() - 1)))


def scm_loss(student, teacher, x0: torch.Tensor, y, cfg: SCMConfig, *, step: int = 0, noise=None, t=None,
             generator: torch.Generator | None = None, logvar: LogVarHead | None = None,
             jvp_attention: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample sCM loss [N] (with gradient into the student and, if adaptive, ``logvar``) and stats.
    ``noise`` is standard normal (scaled by sigma_d here); ``t`` per-sample times (default: log-normal)."""
    n = x0.shape[0]
    sd = student.sigma_d
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
    if t is None:
        t = lognormal_times(n, cfg.p_mean, cfg.p_std, sd, generator)
    t = check_times(torch.as_tensor(t, dtype=torch.float64), n).to(x0.device)
    tt = _bcast(t, x0)
    x_t = (torch.cos(tt) * x0.double() + torch.sin(tt) * sd * noise.double()).to(x0.dtype)
    g, F_minus, _ = scm_tangent(student, teacher, x_t, t, y, cfg, step, jvp_attention)
    finite = torch.isfinite(g.flatten(1)).all(1) & torch.isfinite(F_minus.flatten(1)).all(1)
    bad = int((~finite).sum())
    if bad:
        if cfg.nan_policy == "raise":
            raise FloatingPointError(f"sCM tangent: {bad} of {n} samples are not finite (nan_policy='raise')")
        log.warning("sCM tangent: %d of %d samples non-finite at step %d; dropped from the loss", bad, n, step)
    mask = finite.reshape(-1, *([1] * (g.dim() - 1)))
    g = torch.where(mask, g, torch.zeros_like(g))
    F_minus = torch.where(mask, F_minus.double(), torch.zeros_like(g))
    g_n = normalize_tangent(g, cfg.normalization, cfg.norm_c)
    F = call_raw(student, x_t, t.to(x0.dtype), y, role="student")
    diff = (F.double() - F_minus - g_n).flatten(1)
    per = diff.pow(2).sum(1)
    if cfg.adaptive:
        if logvar is None:
            raise ValueError("SCMConfig.adaptive=True needs a LogVarHead passed as logvar=")
        w = logvar(t).double()
        per = torch.exp(-w) * per / diff.shape[1] + w
    if cfg.prior_weighting:
        per = per / (sd * torch.tan(t.double()))
    per = torch.where(finite, per, torch.zeros_like(per))
    stats = {"scm_nonfinite": float(bad), "tangent_norm": float(g.flatten(1).norm(dim=1).mean()),
             "warmup_r": warmup_ratio(step, cfg.warmup_steps)}
    return per, stats

"""The distillation loop: sCM, rCM (sCM + lambda * DMD) and DMD alone, for any TrigFlow-interface models.

    student = copy.deepcopy(teacher_denoiser)        # students start from the teacher (rCM, sCM)
    result = distill(student, teacher, data_fn, DistillConfig(method="rcm", lam=0.1, steps=500))

``data_fn(step, generator) -> (x0, y)`` gives a data batch (rCM's sCM branch needs data; the DMD branch
and the fake score only see student rollouts). Models are kept in eval mode (no label dropout: the
student distils one fixed CFG scale and has no guidance input). Why not ``fewer.train.train``: rCM
alternates two optimizers (student and fake score, at their own update ratio), which that loop's
one-model-one-optimizer contract cannot express; this loop is short and explicit instead.

Per student update (``steps`` of them): with ``method`` in (rcm, dmd) first ``critic_steps`` fake-score
updates (flow matching on detached rollouts at t ~ p_D), then one student update with
loss = mean_i sCM_i + lam * mean_i DMD_i ("rcm"), sCM only ("scm") or DMD only ("dmd"). During the
tangent warm-up (step < warmup_steps) rCM runs sCM alone and no critic steps (rCM's schedule).
Optimizers: AdamW(beta1=0, beta2=0.999, weight decay 0.01), no gradient clipping (rCM App. D).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import Config, check_choice, check_positive_int, check_range
from . import dmd as dmd_mod
from .scm import LogVarHead, SCMConfig, lognormal_times, scm_loss
from .samplers import t_max_for

log = logging.getLogger(__name__)

METHODS = ("scm", "rcm", "dmd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    method: str = "rcm"
    steps: int = 500                # student updates
    batch_size: int = 128
    lr: float = 1e-4
    lr_fake: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    lam: float = 0.1                # rCM's weight of the DMD term (re-calibrated for small D: sweep decades)
    critic_steps: int = 4           # fake-score updates per student update (rCM: 4 or 9)
    max_rollout: int = 4            # student rollout length N ~ U{1..max_rollout}
    dmd_p_mean: float = 0.0         # p_D, the DMD / fake-score time proposal (rCM Cosmos: 0, 1.6)
    dmd_p_std: float = 1.6
    sigma_max: float = 80.0         # rollout and sampler start t_max = arctan(sigma_max / sigma_d)
    # ---- the sCM term (see SCMConfig) ----
    guidance_scale: float = 1.0
    p_mean: float = -0.8
    p_std: float = 1.6
    normalization: str = "l2"
    norm_c: float = 0.1
    warmup_steps: int = 0
    warmup: str = "rcm"
    adaptive: bool = False
    prior_weighting: bool = False
    variant: str = "continuous"
    discrete_steps: int = 64
    tangent: str = "jvp"
    nan_policy: str = "skip"
    seed: int = 0
    log_every: int = 50

    def validate(self) -> None:
        check_choice(self, "method", METHODS)
        for name in ("steps", "batch_size", "max_rollout", "log_every"):
            check_positive_int(self, name)
        check_range(self, "critic_steps", 0, None)
        for name in ("lr", "lr_fake"):
            check_range(self, name, 0.0, None, low_open=True)
        check_range(self, "beta1", 0.0, 1.0, high_open=True)
        check_range(self, "beta2", 0.0, 1.0, high_open=True)
        check_range(self, "weight_decay", 0.0, None)
        if isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) and self.lam < 0:
            raise ValueError(f"DistillConfig.lam={self.lam} is not allowed: the DMD weight lambda must be >= 0 "
                             "(a negative weight would push the student away from the teacher's distribution)")
        check_range(self, "lam", 0.0, None)
        check_range(self, "sigma_max", 0.0, None, low_open=True)
        check_range(self, "seed", 0, None)
        self.scm_config()  # validates the sCM fields

    def scm_config(self) -> SCMConfig:
        names = {f.name for f in dataclasses.fields(SCMConfig)}
        return SCMConfig(**{k: v for k, v in self.to_dict().items() if k in names})


DistillConfig.register_preset("toy-cpu", steps=400, batch_size=128, lr=3e-4, lr_fake=1e-3, critic_steps=2,
                              guidance_scale=2.0, lam=0.1, log_every=100)
DistillConfig.register_preset("digits-cpu", steps=300, batch_size=64, lr=2e-4, lr_fake=4e-4, critic_steps=2,
                              guidance_scale=2.0, lam=0.1, log_every=50)
DistillConfig.register_preset("digits-gpu", steps=5000, batch_size=256, lr=5e-5, lr_fake=1e-4, critic_steps=4,
                              guidance_scale=2.0, lam=0.1, warmup_steps=500, log_every=100)


@dataclass
class DistillResult:
    student: nn.Module
    fake: nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_samples: int = 0
    seconds: float = 0.0


def _adamw(params, lr: float, cfg: DistillConfig):
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def distill(student: nn.Module, teacher, data_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, Any]],
            cfg: DistillConfig, fake: nn.Module | None = None, progress: bool = False,
            jvp_attention: bool = True) -> DistillResult:
    """Train ``student`` (in place) to sample in few steps. ``fake`` defaults to a copy of the student
    as given (rCM initialises both from the teacher). Returns the trained student, fake score and log."""
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig; got {type(cfg).__name__}")
    if abs(student.sigma_d - teacher.sigma_d) > 1e-12:
        raise ValueError(f"student sigma_d={student.sigma_d} differs from the teacher's {teacher.sigma_d}")
    uses_dmd = cfg.method in ("rcm", "dmd")
    uses_scm = cfg.method in ("rcm", "scm")
    scm_cfg = cfg.scm_config()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    student.eval()
    if hasattr(teacher, "eval"):
        teacher.eval()
    device = next(student.parameters()).device
    if uses_dmd and fake is None:
        fake = copy.deepcopy(student)
    logvar = LogVarHead().to(device) if (uses_scm and cfg.adaptive) else None
    params = list(student.parameters()) + (list(logvar.parameters()) if logvar is not None else [])
    opt = _adamw(params, cfg.lr, cfg)
    opt_fake = None
    if uses_dmd:
        fake.eval()
        opt_fake = _adamw(fake.parameters(), cfg.lr_fake, cfg)
    t_max = t_max_for(cfg.sigma_max, student.sigma_d)
    history: list[dict[str, Any]] = []
    acc: dict[str, float] = {}
    nonfinite = 0
    start = time.perf_counter()

    def add(name, value):
        acc[name] = acc.get(name, 0.0) + float(value)

    for step in range(cfg.steps):
        in_warmup = step < cfg.warmup_steps and cfg.method == "rcm"
        x0, y = data_fn(step, gen)
        x0 = x0.to(device)
        y = None if y is None else y.to(device)
        n = x0.shape[0]
        shape = tuple(x0.shape)
        # ---- fake-score (critic) updates ----
        if uses_dmd and not in_warmup:
            for _ in range(cfg.critic_steps):
                k = int(torch.randint(1, cfg.max_rollout + 1, (1,), generator=gen))
                with torch.no_grad():
                    xs, _ = dmd_mod.rollout(student, shape, y, steps=k, t_max=t_max, p_mean=cfg.dmd_p_mean,
                                            p_std=cfg.dmd_p_std, generator=gen, grad=False, device=device)
                t = lognormal_times(n, cfg.dmd_p_mean, cfg.dmd_p_std, student.sigma_d, gen)
                loss_f = dmd_mod.fake_score_loss(fake, xs, y, t, torch.randn(shape, generator=gen).to(device)).mean()
                opt_fake.zero_grad(set_to_none=True)
                loss_f.backward()
                opt_fake.step()
                add("fake_loss", loss_f.item() / max(cfg.critic_steps, 1))
        # ---- student update ----
        total = torch.zeros((), dtype=torch.float64, device=device)
        if uses_scm:
            per, stats = scm_loss(student, teacher, x0, y, scm_cfg, step=step, generator=gen, logvar=logvar,
                                  jvp_attention=jvp_attention)
            total = total + per.mean()
            nonfinite += int(stats["scm_nonfinite"])
            add("scm_loss", per.mean().item())
            add("tangent_norm", stats["tangent_norm"])
        if uses_dmd and not in_warmup:
            k = int(torch.randint(1, cfg.max_rollout + 1, (1,), generator=gen))
            xs, _ = dmd_mod.rollout(student, shape, y, steps=k, t_max=t_max, p_mean=cfg.dmd_p_mean,
                                    p_std=cfg.dmd_p_std, generator=gen, grad=True, device=device)
            t = lognormal_times(n, cfg.dmd_p_mean, cfg.dmd_p_std, student.sigma_d, gen)
            g = dmd_mod.dmd_gradient(fake, teacher, xs, y, t, torch.randn(shape, generator=gen).to(device),
                                     cfg.guidance_scale)
            ok = torch.isfinite(g.flatten(1)).all(1)
            if not bool(ok.all()):
                nonfinite += int((~ok).sum())
                log.warning("DMD gradient: %d of %d samples non-finite at step %d; dropped", int((~ok).sum()), n, step)
                g = torch.where(ok.reshape(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
            per_d = dmd_mod.dmd_loss(xs, g)
            weight = cfg.lam if cfg.method == "rcm" else 1.0
            total = total + weight * per_d.mean()
            add("dmd_loss", per_d.mean().item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        add("loss", total.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            span = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            row = {"step": done, **{k: v / span for k, v in acc.items()}, "nonfinite": nonfinite,
                   "elapsed_s": time.perf_counter() - start}
            history.append(row)
            acc.clear()
            if progress:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    return DistillResult(student=student, fake=fake, history=history, nonfinite_samples=nonfinite,
                         seconds=time.perf_counter() - start)

"""sCM tangent vs finite differences (float64), normalisation, NaN guard, DMD gradient, rollout, bad input."""

import copy
import logging
import math

import pytest
import torch

from fewer.distill import (AnalyticGMMTeacher, DistillConfig, SCMConfig, ToyMLP, distill, dmd_gradient, dmd_loss,
                           normalize_tangent, ring, rollout, scm_loss, scm_tangent)
from fewer.distill.scm import total_derivative_term
from fewer.models.denoiser import TrigFlowDenoiser


def _student(seed=0, dtype=torch.float64, sd=0.6):
    torch.manual_seed(seed)
    den = TrigFlowDenoiser(ToyMLP(time_scale=5.0), sigma_d=sd).to(dtype).eval()
    for p in den.parameters():
        p.data.normal_(0, 0.3)
    return den


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.6
    t = torch.rand(n, generator=g, dtype=torch.float64) * 1.4 + 0.05
    y = torch.arange(n) % 2
    return x, t, y


def _f(den, x, t, y):
    tt = t[:, None]
    return torch.cos(tt) * x - torch.sin(tt) * den.sigma_d * den.raw(x, t, y)


@pytest.mark.parametrize("warmup", ["scm", "rcm"])
def test_tangent_matches_finite_differences(warmup):
    """At r = 1, g * sigma_d = cos t * d f-/dt along dx/dt = teacher velocity (central FD, float64)."""
    den = _student()
    teacher = AnalyticGMMTeacher(ring(), sigma_d=den.sigma_d)
    x, t, y = _batch()
    cfg = SCMConfig(warmup=warmup, normalization="none", guidance_scale=2.0)
    g, F, dxdt = scm_tangent(den, teacher, x, t, y, cfg, step=0, jvp_attention=False)
    h = 1e-5
    with torch.no_grad():
        fd = (_f(den, x + h * dxdt, t + h, y) - _f(den, x - h * dxdt, t - h, y)) / (2 * h)
    expected = torch.cos(t)[:, None] * fd / den.sigma_d
    assert torch.allclose(g, expected, rtol=1e-6, atol=1e-8), (g - expected).abs().max()
    # a wrong tangent (time component dropped) is caught by the same comparison
    with torch.no_grad():
        fd_x_only = (_f(den, x + h * dxdt, t, y) - _f(den, x - h * dxdt, t, y)) / (2 * h)
    assert not torch.allclose(g, torch.cos(t)[:, None] * fd_x_only / den.sigma_d, rtol=1e-4, atol=1e-6)


def test_rearranged_jvp_equals_naive_and_fd_backend():
    den = _student(1)
    x, t, y = _batch(8, 1)
    v = torch.randn_like(x)
    F, jvp = total_derivative_term(den, x, t, y, v, jvp_attention=False)
    _, naive = torch.func.jvp(lambda a, b: den.raw(a, b, y), (x, t), (v, torch.ones_like(t)))
    cs = (torch.cos(t) * torch.sin(t))[:, None]
    assert torch.allclose(jvp, cs * naive, rtol=1e-10, atol=1e-12)
    _, fd = total_derivative_term(den, x, t, y, v, tangent="fd", fd_eps=1e-5)
    assert torch.allclose(fd, jvp, rtol=1e-6, atol=1e-8)


def test_warmup_styles_differ_at_r0_and_agree_at_r1():
    den = _student(2)
    teacher = AnalyticGMMTeacher(ring(), sigma_d=den.sigma_d)
    x, t, y = _batch(8, 2)
    outs = {}
    for style in ("scm", "rcm"):
        for step in (0, 10):
            cfg = SCMConfig(warmup=style, warmup_steps=10, normalization="none")
            outs[style, step] = scm_tangent(den, teacher, x, t, y, cfg, step=step, jvp_attention=False)[0]
    assert torch.allclose(outs["scm", 10], outs["rcm", 10], atol=1e-12)
    assert not torch.allclose(outs["scm", 0], outs["rcm", 0], atol=1e-6)


def test_discrete_variant_converges_to_continuous():
    den = _student(3)
    teacher = AnalyticGMMTeacher(ring(), sigma_d=den.sigma_d)
    x, t, y = _batch(8, 3)
    cont = scm_tangent(den, teacher, x, t, y, SCMConfig(normalization="none"), jvp_attention=False)[0]
    errs = [float((scm_tangent(den, teacher, x, t, y, SCMConfig(normalization="none", variant="discrete",
                                                                 discrete_steps=n))[0] - cont).abs().max())
            for n in (64, 4096)]
    assert errs[1] < errs[0] / 10 and errs[1] < 1e-2


def test_l2_normalisation_is_not_the_papers_typo():
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    out = normalize_tangent(g, "l2", 0.1)
    assert torch.allclose(out.norm(dim=1), torch.tensor([5 / 5.1, 0.5 / 0.6], dtype=torch.float64))
    # the typo ||g||^2 + c would give 5/25.1 and 0.5/0.35
    assert torch.allclose(normalize_tangent(g, "rms", 0.1).norm(dim=1), torch.tensor(
        [5 / (5 / math.sqrt(2) + 0.1), 0.5 / (0.5 / math.sqrt(2) + 0.1)], dtype=torch.float64))
    assert normalize_tangent(g * 10, "clip").abs().max() == 1.0
    with pytest.raises(ValueError, match="normalization"):
        normalize_tangent(g, "l1")


class _NaNTeacher(torch.nn.Module):
    """Analytic velocity, but sample 0 gets NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sigma_d = inner, inner.sigma_d

    def raw(self, x, t, y=None, guidance_scale=1.0):
        out = self.inner.raw(x, t, y, guidance_scale).clone()
        out[0] = float("nan")
        return out


def test_nan_guard_counts_logs_and_can_raise(caplog):
    den = _student(4)
    teacher = _NaNTeacher(AnalyticGMMTeacher(ring(), sigma_d=den.sigma_d))
    x, t, y = _batch(8, 4)
    with caplog.at_level(logging.WARNING, logger="fewer.distill.scm"):
        per, stats = scm_loss(den, teacher, x, y, SCMConfig(), t=t, jvp_attention=False)
    assert stats["scm_nonfinite"] == 1.0 and per[0] == 0 and torch.isfinite(per).all() and (per[1:] > 0).all()
    assert "non-finite" in caplog.text
    per.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in den.parameters() if p.grad is not None)
    with pytest.raises(FloatingPointError, match="not finite"):
        scm_loss(den, teacher, x, y, SCMConfig(nan_policy="raise"), t=t, jvp_attention=False)


def test_dmd_gradient_and_loss():
    fake, teacher = _student(5), _student(6)
    x0, t, y = _batch(8, 5)
    noise = torch.randn_like(x0)
    g = dmd_gradient(fake, teacher, x0, y, t, noise, guidance_scale=1.5)
    x = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * fake.sigma_d * noise
    f_fake = _f(fake, x, t, y)
    f_teach = torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * teacher.sigma_d * teacher.raw(x, t, y, 1.5)
    expected = (f_fake - f_teach) / (x0 - f_teach).abs().mean(1, keepdim=True)
    assert torch.allclose(g, expected, atol=1e-10)
    leaf = x0.clone().requires_grad_(True)
    dmd_loss(leaf, g).sum().backward()
    assert torch.allclose(leaf.grad, 2 * g, atol=1e-12)


def test_rollout_times_monotone_and_gradient_only_through_last_step():
    den = _student(7)
    g = torch.Generator().manual_seed(0)
    x0, times = rollout(den, (32, 2), torch.arange(32) % 2, steps=4, t_max=1.5, p_mean=0.0, p_std=1.6, generator=g)
    assert times.shape == (4, 32) and bool((times[1:] <= times[:-1]).all()) and float(times[0, 0]) == 1.5
    assert x0.requires_grad
    # the graph holds exactly one student call: its gradient equals a single-call gradient
    params = [p for p in den.parameters()]
    grads = torch.autograd.grad(x0.double().sum(), params, allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    with torch.no_grad():
        x0_ng, _ = rollout(den, (4, 2), None, steps=2, t_max=1.5, p_mean=0.0, p_std=1.6, grad=False)
    assert not x0_ng.requires_grad


def test_negative_lambda_and_bad_configs_raise():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        DistillConfig(lam=-0.1)
    with pytest.raises(ValueError, match="normalization"):
        DistillConfig(normalization="l2squared")
    with pytest.raises(ValueError, match="warmup"):
        SCMConfig(warmup="linear")


def test_teacher_shape_mismatch_raises():
    den = _student(8, torch.float32)

    class Wrong(torch.nn.Module):
        sigma_d = den.sigma_d

        def raw(self, x, t, y=None, guidance_scale=1.0):
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValueError, match="teacher's output has shape"):
        scm_loss(den, Wrong(), torch.randn(4, 2), None, SCMConfig(), jvp_attention=False)


@pytest.mark.parametrize("method", ["scm", "rcm", "dmd"])
def test_distill_smoke_runs_and_moves_the_student(method):
    gmm = ring()
    teacher = AnalyticGMMTeacher(gmm)
    torch.manual_seed(0)
    student = TrigFlowDenoiser(ToyMLP(width=32, depth=1), sigma_d=teacher.sigma_d)
    before = copy.deepcopy(student.state_dict())
    cfg = DistillConfig(method=method, steps=4, batch_size=32, critic_steps=1, guidance_scale=2.0, log_every=2)
    res = distill(student, teacher, lambda step, g: gmm.sample(32, g)[:2], cfg)
    assert len(res.history) == 2 and all(math.isfinite(r["loss"]) for r in res.history)
    assert res.nonfinite_samples == 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    if method != "scm":
        assert res.fake is not None and "fake_loss" in res.history[-1]


def test_jvp_through_dit_attention_uses_the_jvp_backend():
    """The tangent through fewer's DiT (attention inside) runs on the jvp attention backend and matches
    central finite differences; torch's default CPU SDPA has no forward-mode AD."""
    from fewer.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig.from_preset("digits8", dim=16, depth=1, heads=2, qk_norm=True, time_scale=5.0))
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    den = TrigFlowDenoiser(net.double(), sigma_d=0.5).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
    t = torch.tensor([0.2, 0.8, 1.3], dtype=torch.float64)
    v = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    _, jvp = total_derivative_term(den, x, t, y, v, jvp_attention=True)
    _, fd = total_derivative_term(den, x, t, y, v, tangent="fd", fd_eps=1e-4)
    rel = float((jvp - fd).norm() / fd.norm())
    assert rel < 1e-3, rel  # time features are float32 inside the DiT, so FD is only ~1e-4 accurate
    with pytest.raises(RuntimeError, match="forward AD"):
        total_derivative_term(den, x, t, y, v, jvp_attention=False)

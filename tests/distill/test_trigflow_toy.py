"""TrigFlow wrappers, the analytic toy teacher, samplers and bad input."""

import math

import pytest
import torch

from fewer.distill import (AnalyticGMMTeacher, EDMTeacher, RectifiedFlowTeacher, ToyMLP, check_times,
                           consistency_fn, consistency_sample, energy_distance, per_sample_noise, ring,
                           teacher_sample, toy_metrics, trigflow_time_from_rf, rf_time)
from fewer.models.denoiser import TrigFlowDenoiser


@pytest.fixture(scope="module")
def gmm():
    return ring()


def _points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.03


def test_rf_wrapper_recovers_the_analytic_teacher(gmm):
    """An RF model built from the analytic posterior, wrapped back onto TrigFlow time, gives the analytic velocity."""
    teacher = AnalyticGMMTeacher(gmm)
    sd = teacher.sigma_d

    def rf_model(x_s, s, y):  # exact RF velocity n - x0 at RF time s
        t = trigflow_time_from_rf(s)
        x_t = x_s.double() * (torch.cos(t) + torch.sin(t))[:, None]
        v = teacher.velocity64(x_t, t, y)
        x0 = torch.cos(t)[:, None] * x_t - torch.sin(t)[:, None] * v
        n = torch.sin(t)[:, None] * x_t + torch.cos(t)[:, None] * v
        return n - x0

    wrapped = RectifiedFlowTeacher(rf_model, sd)
    x, t = _points(64)
    y = torch.arange(64) % 2
    for yy, w in ((y, 1.0), (y, 3.0), (None, 1.0)):
        assert torch.allclose(wrapped.raw(x, t, yy, w), teacher.raw(x, t, yy, w), atol=1e-10, rtol=0)
    # the time maps are inverse to each other
    assert torch.allclose(trigflow_time_from_rf(rf_time(t)), t, atol=1e-12)


def test_edm_wrapper_recovers_the_analytic_teacher(gmm):
    teacher = AnalyticGMMTeacher(gmm)
    sd = teacher.sigma_d

    def edm_model(x_sigma, sigma, y):
        t = torch.atan(sigma.double() / sd)
        return teacher.denoise64(x_sigma.double() * torch.cos(t)[:, None], t, y)

    wrapped = EDMTeacher(edm_model, sd)
    x, t = _points(64, 1)
    assert torch.allclose(wrapped.raw(x, t, None), teacher.raw(x, t, None), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="outside"):
        wrapped.raw(x, torch.zeros(64, dtype=torch.float64))  # sigma = 0 is not an EDM time


def test_analytic_teacher_identities_and_ode_recovers_the_mixture(gmm):
    teacher = AnalyticGMMTeacher(gmm)
    x, t = _points(32, 2)
    v = teacher.velocity64(x, t)
    x0 = teacher.denoise64(x, t)
    tt = t[:, None]
    assert torch.allclose(torch.cos(tt) * x - torch.sin(tt) * v, x0, atol=1e-12)     # x0 = cos x - sin v
    assert torch.allclose(teacher.denoise64(x, torch.zeros(32, dtype=torch.float64)), x, atol=1e-12)  # f(x, 0) = x
    # the exact probability-flow ODE carries N(0, sigma_d^2) to the mixture
    n = 2000
    noise = per_sample_noise(range(n), (2,), 1)[0]
    out = teacher_sample(teacher, noise.double(), steps=200)
    data, _, _ = gmm.sample(n, torch.Generator().manual_seed(1))
    ed = energy_distance(out, data)
    data2, _, _ = gmm.sample(n, torch.Generator().manual_seed(2))
    assert ed < 3 * energy_distance(data2, data) + 2e-3
    mass = torch.bincount(gmm.nearest_mode(out).clamp_min(0), minlength=8).double() / n
    assert torch.allclose(mass, gmm.weights, atol=0.03)
    # and a wrong teacher (means shifted) is detected by the same check
    assert energy_distance(out + 0.3, data) > 10 * ed


def test_toy_metrics_detect_dropped_modes(gmm):
    data, _, comp = gmm.sample(1000, torch.Generator().manual_seed(0))
    m = toy_metrics(gmm, data, data)
    assert m["modes_covered"] == 8 and m["precision"] > 0.97 and m["paired_l2"] == 0.0
    collapsed = data.clone()
    collapsed[comp == 7] = gmm.means[6].float()
    assert toy_metrics(gmm, collapsed, data)["modes_covered"] == 7


def test_consistency_fn_boundary_and_shape_check():
    den = TrigFlowDenoiser(ToyMLP(), sigma_d=0.5)
    x = torch.randn(5, 2)
    assert torch.allclose(consistency_fn(den, x, torch.zeros(5)), x)

    class Bad(torch.nn.Module):
        sigma_d = 0.5

        def raw(self, x, t, y=None, guidance_scale=1.0):
            return x[:, :1]

    with pytest.raises(ValueError, match="output has shape"):
        consistency_fn(Bad(), x, torch.full((5,), 0.5), role="teacher")


@pytest.mark.parametrize("bad", [-0.1, 1.6, float("nan")])
def test_times_outside_range_raise(bad):
    with pytest.raises(ValueError, match="TrigFlow|outside|non-finite"):
        check_times(torch.tensor([0.3, bad]))
    den = TrigFlowDenoiser(ToyMLP(), sigma_d=0.5)
    with pytest.raises(ValueError):
        consistency_fn(den, torch.randn(2, 2), torch.tensor([0.3, bad]))


def test_samplers_do_not_depend_on_batch():
    torch.manual_seed(0)
    den = TrigFlowDenoiser(ToyMLP(), sigma_d=0.5).eval()
    for p in den.parameters():
        p.data.normal_(0, 0.2)
    labels = torch.arange(6) % 2
    full = per_sample_noise(range(6), (2,), 4)
    alone = per_sample_noise([3], (2,), 4)
    for k in (1, 2, 4):
        a = consistency_sample(den, full, labels, steps=k)
        b = consistency_sample(den, alone, labels[3:4], steps=k)
        assert torch.allclose(a[3:4], b, atol=1e-6), k
    # different seeds give different samples (the test can fail)
    assert not torch.allclose(consistency_sample(den, full, labels, steps=2)[0],
                              consistency_sample(den, full, labels, steps=2)[1])
    with pytest.raises(ValueError, match="intermediate"):
        consistency_sample(den, full, labels, steps=2, mid_times=[1.0, 0.5])
    with pytest.raises(ValueError, match="intermediate times"):
        consistency_sample(den, full, labels, steps=2, mid_times=[2.0])
    with pytest.raises(ValueError, match="noise draws"):
        consistency_sample(den, full[:1], labels, steps=2)

import math

import pytest
import torch
from torch import nn

from fewer.core import per_sample_generators, randn_per_sample
from fewer.models import (DiT, DiTConfig, LogNormalTime, TrigFlowDenoiser, UniformTime, noise_from_velocity,
                          noisy_sample, sample, sample_ode, time_grid, trigflow_loss, velocity_target,
                          x0_from_velocity)

from .tolerances import TOLERANCES


def _small_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, dim=32, depth=2, heads=2, num_classes=10, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class GaussianOracle(nn.Module):
    """Exact TrigFlow network for data x0 ~ N(mu, s^2 I), with net(x / sigma_d, t) = v / sigma_d.

    E[v | x_t] with x_t = cos t x0 + sin t z (z ~ N(0, sigma_d^2)) is linear in x_t.
    """

    def __init__(self, mu: float, s: float, sigma_d: float):
        super().__init__()
        self.mu, self.s, self.sigma_d = mu, s, sigma_d

    def forward(self, x_in, t, y=None):
        x_t = x_in.double() * self.sigma_d
        c, si = torch.cos(t.double()).view(-1, 1, 1, 1), torch.sin(t.double()).view(-1, 1, 1, 1)
        var_x = c ** 2 * self.s ** 2 + si ** 2 * self.sigma_d ** 2
        cov_vx = c * si * (self.sigma_d ** 2 - self.s ** 2)   # Cov(v, x_t) per element
        mean_v = -si * self.mu
        mean_x = c * self.mu
        v = mean_v + cov_vx / var_x * (x_t - mean_x)
        return (v / self.sigma_d).to(x_in.dtype)


def test_trigflow_identities_recover_x0_and_noise_exactly():
    x0 = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    z = 0.5 * torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.8, 1.3, math.pi / 2], dtype=torch.float64)
    x_t = noisy_sample(x0, z, t)
    v = velocity_target(x0, z, t)
    assert torch.allclose(x0_from_velocity(x_t, v, t), x0, atol=TOLERANCES["trigflow_identity_atol"])
    assert torch.allclose(noise_from_velocity(x_t, v, t), z, atol=TOLERANCES["trigflow_identity_atol"])
    # v is the time derivative of x_t: compare with a central difference
    h = 1e-6
    fd = (noisy_sample(x0, z, t + h) - noisy_sample(x0, z, t - h)) / (2 * h)
    assert torch.allclose(fd, v, atol=1e-8)


def test_loss_of_an_exact_velocity_net_is_zero_and_of_a_wrong_one_is_not():
    """A net that returns v / sigma_d for the very (x0, z) pair has zero loss; the loss is per sample."""
    x0 = torch.randn(4, 1, 8, 8)
    noise = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.1, 0.5, 1.0, 1.5])
    sigma_d = 0.5

    class Cheat(nn.Module):
        def forward(self, x_in, t_in, y=None):
            return velocity_target(x0, sigma_d * noise, t_in) / sigma_d

    loss = trigflow_loss(TrigFlowDenoiser(Cheat(), sigma_d), x0, noise=noise, t=t)
    assert loss.shape == (4,) and float(loss.abs().max()) < 1e-10
    zero_net = TrigFlowDenoiser(DiT(DiTConfig(input_size=8, patch_size=2, dim=32, depth=1, heads=2)), sigma_d)
    loss_zero = trigflow_loss(zero_net, x0, torch.zeros(4, dtype=torch.long), noise=noise, t=t)
    expected = (velocity_target(x0, sigma_d * noise, t) / sigma_d).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss_zero, expected, atol=1e-6)


def test_gaussian_oracle_attains_the_irreducible_loss():
    """For Gaussian data the posterior-mean velocity is known; its loss equals Var(v | x_t) / sigma_d^2
    and any other linear predictor does worse."""
    mu, s, sigma_d = 0.3, 0.8, 0.5
    oracle = TrigFlowDenoiser(GaussianOracle(mu, s, sigma_d), sigma_d)
    gen = torch.Generator().manual_seed(0)
    n, t_val = 4000, 0.7
    x0 = (mu + s * torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64))
    noise = torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.float64)
    loss = trigflow_loss(oracle, x0, noise=noise, t=t).mean()
    c, si = math.cos(t_val), math.sin(t_val)
    var_v = c ** 2 * sigma_d ** 2 + si ** 2 * s ** 2
    var_x = c ** 2 * s ** 2 + si ** 2 * sigma_d ** 2
    cov = c * si * (sigma_d ** 2 - s ** 2)
    irreducible = (var_v - cov ** 2 / var_x) / sigma_d ** 2
    assert abs(float(loss) - irreducible) < 4 * irreducible / math.sqrt(n * 4 / 2)

    class Scaled(GaussianOracle):
        def forward(self, x_in, t_in, y=None):
            return 1.1 * super().forward(x_in, t_in, y)

    worse = trigflow_loss(TrigFlowDenoiser(Scaled(mu, s, sigma_d), sigma_d), x0, noise=noise, t=t).mean()
    assert float(worse) > float(loss)


def test_ode_sampler_maps_gaussian_noise_to_the_data_gaussian():
    """With the exact Gaussian velocity the PF-ODE carries N(0, sigma_d^2) to N(mu, s^2)."""
    mu, s, sigma_d = 0.3, 0.8, 0.5
    oracle = TrigFlowDenoiser(GaussianOracle(mu, s, sigma_d), sigma_d)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {}
    for solver, steps in (("euler", 8), ("heun", 8), ("ddim", 8), ("heun", 64)):
        out = sample_ode(oracle, noise, steps=steps, solver=solver)
        errors[solver, steps] = abs(float(out.mean()) - mu) + abs(float(out.std()) - s)
    assert errors["heun", 64] < 0.03
    assert errors["heun", 8] < errors["euler", 8]


def test_sampler_is_deterministic_and_independent_of_batch_size():
    denoiser = TrigFlowDenoiser(_small_dit(), sigma_d=0.5)
    seeds = [11, 12, 13, 14, 15]
    labels = torch.tensor([0, 1, 2, 3, 4])
    all_at_once = sample(denoiser, seeds, (1, 8, 8), labels, steps=4, guidance_scale=2.0)
    in_pieces = torch.cat([sample(denoiser, seeds[:2], (1, 8, 8), labels[:2], steps=4, guidance_scale=2.0),
                           sample(denoiser, seeds[2:], (1, 8, 8), labels[2:], steps=4, guidance_scale=2.0)])
    assert torch.allclose(all_at_once, in_pieces, atol=TOLERANCES["batch_invariance_atol"])
    again = sample(denoiser, seeds, (1, 8, 8), labels, steps=4, guidance_scale=2.0)
    assert torch.equal(all_at_once, again)
    other = sample(denoiser, [99] + seeds[1:], (1, 8, 8), labels, steps=4, guidance_scale=2.0)
    assert not torch.allclose(other[0], all_at_once[0]) and torch.allclose(other[1:], all_at_once[1:], atol=1e-6)


def test_guidance_reaches_the_network_and_scale_one_is_conditional():
    denoiser = TrigFlowDenoiser(_small_dit(), sigma_d=0.5)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    cond = denoiser.velocity(x, t, y)
    assert torch.equal(denoiser.velocity(x, t, y, guidance_scale=1.0), cond)
    assert torch.allclose(cond, 0.5 * denoiser.net(x / 0.5, t, y))
    assert not torch.allclose(denoiser.velocity(x, t, y, guidance_scale=3.0), cond)
    with pytest.raises(ValueError, match="labels"):
        denoiser.velocity(x, t, None, guidance_scale=2.0)


def test_denoise_at_time_zero_returns_the_input():
    denoiser = TrigFlowDenoiser(_small_dit(), sigma_d=0.5)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(denoiser.denoise(x, torch.zeros(2), torch.tensor([0, 1])), x)


def test_time_proposals():
    gen = torch.Generator().manual_seed(0)
    t = LogNormalTime(p_mean=-1.2, p_std=1.2, sigma_d=0.5)(20000, gen)
    assert t.shape == (20000,) and float(t.min()) > 0 and float(t.max()) < math.pi / 2
    log_sigma = torch.log(0.5 * torch.tan(t.double()))  # back to EDM's sigma
    assert abs(float(log_sigma.mean()) + 1.2) < 0.05 and abs(float(log_sigma.std()) - 1.2) < 0.05
    u = UniformTime()(20000, gen)
    assert abs(float(u.mean()) - math.pi / 4) < 0.02 and float(u.min()) >= 0 and float(u.max()) <= math.pi / 2
    grid = time_grid(4)
    assert torch.allclose(grid, torch.tensor([4, 3, 2, 1, 0], dtype=torch.float64) * math.pi / 8)


def test_per_sample_noise_is_what_sample_uses():
    denoiser = TrigFlowDenoiser(_small_dit(), sigma_d=0.7)
    noise = randn_per_sample(per_sample_generators([3, 4]), (1, 8, 8))
    direct = sample_ode(denoiser, noise, torch.tensor([5, 6]), steps=3, solver="euler")
    via_seeds = sample(denoiser, [3, 4], (1, 8, 8), torch.tensor([5, 6]), steps=3, solver="euler")
    assert torch.equal(direct, via_seeds)


def test_bad_arguments():
    denoiser = TrigFlowDenoiser(_small_dit(), sigma_d=0.5)
    noise = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="solver"):
        sample_ode(denoiser, noise, steps=2, solver="rk4")
    with pytest.raises(ValueError, match="steps"):
        sample_ode(denoiser, noise, steps=0)
    with pytest.raises(ValueError, match="decreasing"):
        sample_ode(denoiser, noise, times=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma_d"):
        TrigFlowDenoiser(_small_dit(), sigma_d=0.0)
    with pytest.raises(ValueError, match="noise shape"):
        trigflow_loss(denoiser, noise, noise=torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="one time per sample"):
        trigflow_loss(denoiser, noise, t=torch.rand(3))


def test_trigflow_training_on_digits_reduces_the_loss():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = torch.tensor(datasets.load_digits().images[:512], dtype=torch.float32).unsqueeze(1) / 8 - 1
    labels = torch.tensor(datasets.load_digits().target[:512], dtype=torch.long)
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(DiT(DiTConfig(input_size=8, patch_size=2, dim=32, depth=2, heads=2)),
                                sigma_d=float(digits.std()))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    eval_noise, eval_t = torch.randn(512, 1, 8, 8, generator=gen), LogNormalTime()(512, gen)

    def held_loss():
        with torch.no_grad():
            return float(trigflow_loss(denoiser.eval(), digits, labels, noise=eval_noise, t=eval_t).mean())

    before = held_loss()
    denoiser.train()
    for _ in range(40):
        idx = torch.randint(0, 512, (64,), generator=gen)
        loss = trigflow_loss(denoiser, digits[idx], labels[idx], generator=gen).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_loss()
    assert after < TOLERANCES["train_loss_ratio"] * before, (before, after)

"""The 2-D Gaussian-mixture toy: data, its exact (analytic) TrigFlow teacher, a small MLP network,
and metrics that need no learned evaluator.

Data: an 8-mode ring (radius ``radius``, isotropic component std ``std``), mode k weighted k + 1
(imbalanced, so dropped modes show), two classes (modes 0-3 = class 0, 4-7 = class 1) for
classifier-free guidance.

Analytic teacher. With x0 ~ N(mu_k, s^2 I) for component k and x_t = cos t x0 + sin t z,
z ~ N(0, sigma_d^2 I): x_t | k ~ N(cos t mu_k, V I) with V = cos^2 t s^2 + sin^2 t sigma_d^2, and
(x0, z, x_t) are jointly Gaussian, so with r = x_t - cos t mu_k

    E[x0 | x_t, k] = mu_k + cos t s^2 / V r,     E[z | x_t, k] = sin t sigma_d^2 / V r,
    E[v  | x_t, k] = cos t E[z] - sin t E[x0] = -sin t mu_k + sin t cos t (sigma_d^2 - s^2) / V r.

The exact velocity is the responsibility-weighted sum over components (responsibilities from
N(x_t; cos t mu_k, V)); no division by sin t, so it is exact at t = 0 and t = pi/2. float64 throughout.
Conditional (y = class) uses only that class's components; y = None (or the null class) all of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .trigflow import check_times, guided


class GaussianMixture:
    """Isotropic Gaussian mixture in 2-D with a class per component."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor, classes: torch.Tensor,
                 num_classes: int):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.std = float(std)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        self.num_classes = int(num_classes)
        if self.means.dim() != 2 or self.weights.shape != (self.means.shape[0],) or self.classes.shape != self.weights.shape:
            raise ValueError("means [K, D], weights [K] and classes [K] must agree")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def sigma_d(self) -> float:
        """Per-coordinate standard deviation of the data (averaged over coordinates)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights[:, None] * (self.means - mean) ** 2).sum(0) + self.std ** 2
        return float(second.mean().sqrt())

    def component_weights(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """[n, K] prior weights of the components given labels (None or null class = all)."""
        w = self.weights.expand(n, -1).clone()
        if y is None:
            return w
        y = torch.as_tensor(y).long().cpu()
        mask = (self.classes[None, :] == y[:, None]) | (y[:, None] >= self.num_classes)
        w = w * mask
        return w / w.sum(1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [n, D] float32, labels [n], component ids [n]); labels drawn from the data if y is None."""
        w = self.component_weights(y, n)
        comp = torch.multinomial(w, 1, generator=generator).squeeze(1)
        x = self.means[comp] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x.float(), self.classes[comp].clone(), comp

    def nearest_mode(self, x: torch.Tensor, within: float = 3.0) -> torch.Tensor:
        """Index of the nearest mode for each point, or -1 if farther than ``within`` component stds."""
        d = torch.cdist(x.double().cpu(), self.means)
        dist, idx = d.min(dim=1)
        return torch.where(dist <= within * self.std, idx, torch.full_like(idx, -1))


def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.08, imbalanced: bool = True,
         num_classes: int = 2) -> GaussianMixture:
    angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.arange(1, num_modes + 1, dtype=torch.float64) if imbalanced else torch.ones(num_modes)
    classes = torch.arange(num_modes) * num_classes // num_modes
    return GaussianMixture(means, std, weights, classes, num_classes)


class AnalyticGMMTeacher(nn.Module):
    """The exact TrigFlow velocity of a GaussianMixture, behind the denoiser interface (raw/velocity/denoise)."""

    def __init__(self, gmm: GaussianMixture, sigma_d: float | None = None):
        super().__init__()
        self.gmm = gmm
        self.sigma_d = float(sigma_d if sigma_d is not None else gmm.sigma_d)

    def _posterior(self, x_t: torch.Tensor, t: torch.Tensor, y):
        x = x_t.double().cpu()
        n = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.gmm.dim:
            raise ValueError(f"the toy teacher takes points [N, {self.gmm.dim}]; got {tuple(x_t.shape)}")
        tt = t.double().cpu().reshape(n, 1, 1)
        c, s = torch.cos(tt), torch.sin(tt)
        var = c ** 2 * self.gmm.std ** 2 + s ** 2 * self.sigma_d ** 2            # [n, 1, 1]
        r = x[:, None, :] - c * self.gmm.means[None]                              # [n, K, D]
        logw = self.gmm.component_weights(y, n).log()
        logp = logw - 0.5 * (r ** 2).sum(-1) / var[:, :, 0] - 0.5 * self.gmm.dim * torch.log(var[:, :, 0])
        resp = torch.softmax(logp, dim=1)                                         # [n, K]
        return resp, r, c, s, var

    def velocity64(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        resp, r, c, s, var = self._posterior(x_t, t, y)
        v_k = -s * self.gmm.means[None] + s * c * (self.sigma_d ** 2 - self.gmm.std ** 2) / var * r
        return (resp[:, :, None] * v_k).sum(1)

    def denoise64(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] exactly."""
        resp, r, c, s, var = self._posterior(x_t, t, y)
        x0_k = self.gmm.means[None] + c * self.gmm.std ** 2 / var * r
        return (resp[:, :, None] * x0_k).sum(1)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            guidance_scale: float = 1.0) -> torch.Tensor:
        t = check_times(t, x_t.shape[0])
        v = self.velocity64(x_t, t, y)
        if guidance_scale != 1.0:
            if y is None:
                raise ValueError("guidance_scale != 1 needs labels y (classifier-free guidance)")
            v = guided(v, self.velocity64(x_t, t, None), guidance_scale)
        return (v / self.sigma_d).to(device=x_t.device, dtype=x_t.dtype)

    def velocity(self, x_t, t, y=None, guidance_scale: float = 1.0):
        return self.sigma_d * self.raw(x_t, t, y, guidance_scale)

    def denoise(self, x_t, t, y=None, guidance_scale: float = 1.0):
        from .trigflow import consistency_fn
        return consistency_fn(self, x_t, t, y, guidance_scale)


def time_features(dim: int, positions: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
    """sin-cos features like ``fewer.models.layers.sincos_1d`` but returned in float64 (not rounded to
    float32), so float64 finite-difference checks of tangents through time stay exact."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ToyMLP(nn.Module):
    """F(x, t, y) for points [N, D]: sin-cos features of time_scale * t and a class table (with a null
    row for CFG) added to the input projection, then SiLU MLP blocks with LayerNorm (no BatchNorm: it
    breaks torch.func.jvp). Follows the DiT's ``forward(x, t, y)`` / ``forward_with_cfg`` contract."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, num_classes: int = 2,
                 time_scale: float = 20.0, freq_dim: int = 32):
        super().__init__()
        self.dim, self.num_classes, self.time_scale, self.freq_dim = dim, num_classes, time_scale, freq_dim
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ToyMLP expects points [N, {self.dim}]; got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        feats = time_features(self.freq_dim, t * self.time_scale).to(x.dtype)
        h = self.inp(x) + self.time(feats) + self.label(y).to(x.dtype)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def forward_with_cfg(self, x, t, y, guidance_scale: float):
        if guidance_scale == 1.0:
            return self(x, t, y)
        return guided(self(x, t, y), self(x, t, None), guidance_scale)


# ---------------------------------------------------------------------------------------------
# Metrics (exact, because the data distribution is known)
# ---------------------------------------------------------------------------------------------

def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|a - b| - E|a - a'| - E|b - b'| (V-statistic; float64). 0 iff the distributions match."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def toy_metrics(gmm: GaussianMixture, samples: torch.Tensor, reference: torch.Tensor,
                min_share: float = 0.25) -> dict[str, float]:
    """samples and reference are paired (same noise, same labels); reference = the analytic teacher's
    accurate ODE solution. Returns:
    precision: share of samples within 3 component stds of a mode;
    modes_covered: modes whose sample mass is >= min_share of the reference's mass there (over modes
      holding >= 1 % of the reference);
    paired_l2: mean ||sample - reference|| for the same noise; energy: energy distance to the reference."""
    k = gmm.means.shape[0]
    ms, mr = gmm.nearest_mode(samples), gmm.nearest_mode(reference)
    mass_s = torch.bincount(ms[ms >= 0], minlength=k).double() / len(ms)
    mass_r = torch.bincount(mr[mr >= 0], minlength=k).double() / len(mr)
    present = mass_r >= 0.01
    covered = (mass_s >= min_share * mass_r) & present
    return {"precision": float((ms >= 0).double().mean()),
            "modes_covered": float(covered.sum()), "modes_present": float(present.sum()),
            "paired_l2": float((samples.double().cpu() - reference.double().cpu()).norm(dim=1).mean()),
            "energy": energy_distance(samples, reference)}

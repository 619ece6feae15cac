import math

import pytest
import torch
from torch import nn

from fewer.eval import (SampleEvaluator, classifier_accuracy, frechet_distance, gaussian_window, per_class_diversity,
                        precision_recall, psnr, sample_quality, ssim)

from .tolerances import TOLERANCES


def _random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _closed_form_fd(mu1, c1, mu2, c2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), written independently with eigh."""
    e, v = torch.linalg.eigh(c1)
    r1 = v @ torch.diag(e.sqrt()) @ v.T
    e2, v2 = torch.linalg.eigh(r1 @ c2 @ r1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2)
                 - 2 * torch.trace(v2 @ torch.diag(e2.clamp_min(0).sqrt()) @ v2.T))


def _exact_samples(mu: torch.Tensor, cov: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly mu and cov."""
    d = mu.shape[0]
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    whiten = torch.linalg.cholesky(x.T @ x / (n - 1))
    x = x @ torch.linalg.inv(whiten).T            # sample covariance = I
    return x @ torch.linalg.cholesky(cov).T + mu


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(300, 16)
    for method in ("eigh", "scipy"):
        assert frechet_distance(feats, feats, method=method) < TOLERANCES["fd_self_abs"]


@pytest.mark.parametrize("method", ["eigh", "scipy", "auto"])
def test_frechet_distance_matches_the_closed_form_for_known_gaussians(method):
    gen = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    c1, c2 = _random_spd(d, gen), _random_spd(d, gen)
    a, b = _exact_samples(mu1, c1, 200, gen), _exact_samples(mu2, c2, 150, gen)
    expected = _closed_form_fd(mu1, c1, mu2, c2)
    assert abs(frechet_distance(a, b, method=method) - expected) < TOLERANCES["fd_closed_form_rel"] * expected


def test_frechet_distance_of_isotropic_gaussians_in_one_line():
    """N(0, s1^2 I) vs N(m, s2^2 I) in d dims: FD = d m^2 + d (s1 - s2)^2."""
    gen = torch.Generator().manual_seed(1)
    d, m, s1, s2 = 5, 0.7, 1.0, 2.5
    eye = torch.eye(d, dtype=torch.float64)
    a = _exact_samples(torch.zeros(d, dtype=torch.float64), s1 ** 2 * eye, 100, gen)
    b = _exact_samples(torch.full((d,), m, dtype=torch.float64), s2 ** 2 * eye, 100, gen)
    assert abs(frechet_distance(a, b) - (d * m ** 2 + d * (s1 - s2) ** 2)) < 1e-9


def test_frechet_distance_methods_agree_and_grow_with_shift():
    a = torch.randn(400, 12)
    b = torch.randn(400, 12) * 1.3 + 0.2
    eigh, scipy_value = frechet_distance(a, b, method="eigh"), frechet_distance(a, b, method="scipy")
    assert abs(eigh - scipy_value) < TOLERANCES["fd_methods_rel"] * eigh
    assert frechet_distance(a, b + 1.0) > eigh


def test_precision_recall_of_a_set_with_itself_is_one_and_detects_missing_modes():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = (centres.repeat_interleave(100, 0) + 0.5 * torch.randn(400, 2, generator=gen))
    assert precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}
    # fakes covering only two of the four modes: full precision, about half the recall
    fake = centres[:2].repeat_interleave(100, 0) + 0.5 * torch.randn(200, 2, generator=gen)
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.6
    # fakes far away from every real point: precision 0
    assert precision_recall(real, fake + 100.0, k=3)["precision"] == 0.0


def test_per_class_diversity_matches_a_hand_computation():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has one sample: skipped
    out = per_class_diversity(feats, labels)
    assert out["per_class"] == {0: pytest.approx(5.0), 1: pytest.approx((1 + 2 + 1) / 3)}
    assert out["mean"] == pytest.approx((5.0 + 4 / 3) / 2)


def test_classifier_accuracy_counts_correct_predictions():
    class Sign(nn.Module):  # class 1 if the mean pixel is positive
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-m, m], dim=1)

    images = torch.cat([torch.ones(6, 1, 4, 4), -torch.ones(4, 1, 4, 4)])
    labels = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 1])  # one wrong among the positives, one among negatives
    assert classifier_accuracy(Sign(), images, labels, batch_size=3) == pytest.approx(0.8)


def test_psnr_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[0] += 0.1                    # MSE 0.01 -> 10 log10(4 / 0.01) = 26.02 dB for range 2
    b[1, :, :4] += 0.2             # MSE 0.02
    values = psnr(a, b, data_range=2.0, reduction="none")
    assert torch.allclose(values, torch.tensor([10 * math.log10(400), 10 * math.log10(200)], dtype=torch.float64))
    assert psnr(a, a, 1.0) == math.inf


def _ssim_brute_force(x: torch.Tensor, y: torch.Tensor, data_range: float, size: int, sigma: float) -> float:
    """Per-window SSIM with explicit loops over valid positions (one channel, float64)."""
    g = gaussian_window(size, sigma)
    w = torch.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(torch.stack(values).mean())


def test_ssim_matches_a_brute_force_window_loop():
    x = torch.rand(1, 1, 16, 14, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    ours = ssim(x, y, data_range=1.0)
    assert abs(ours - _ssim_brute_force(x[0, 0], y[0, 0], 1.0, 11, 1.5)) < TOLERANCES["ssim_oracle_atol"]
    small_x, small_y = x[..., :8, :8], y[..., :8, :8]  # 8x8: window shrinks to 7 taps, sigma 1.5 * 7 / 11
    assert abs(ssim(small_x, small_y, 1.0)
               - _ssim_brute_force(small_x[0, 0], small_y[0, 0], 1.0, 7, 1.5 * 7 / 11)) < TOLERANCES["ssim_oracle_atol"]


def test_ssim_properties():
    x = torch.rand(3, 2, 20, 20) * 2 - 1
    assert ssim(x, x, data_range=2.0) == pytest.approx(1.0, abs=1e-12)
    noisy = [ssim(x, x + s * torch.randn_like(x), 2.0) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]
    y = x + 0.3 * torch.randn_like(x)
    assert ssim(x, y, 2.0) == pytest.approx(ssim(y, x, 2.0), abs=1e-12)
    # constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    flat_a = torch.full((1, 1, 12, 12), a, dtype=torch.float64)
    flat_b = torch.full((1, 1, 12, 12), b, dtype=torch.float64)
    const = ssim(flat_a, flat_b, 1.0)
    assert const == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)


class _LinearFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def features(self, x):
        return self.proj(x.flatten(1))

    def forward(self, x):
        return self.features(x)


def test_sample_evaluator_bundle():
    torch.manual_seed(0)
    clf = _LinearFeatures()
    real = torch.randn(60, 1, 4, 4)
    labels = torch.randint(0, 8, (60,))
    evaluator = SampleEvaluator(clf, real)
    same = evaluator(real.clone(), labels)
    assert same["frechet_distance"] < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert set(same) == {"frechet_distance", "precision", "recall", "num_real", "num_fake", "class_accuracy",
                         "diversity", "real_diversity"}
    shifted = evaluator(real + 0.5)
    assert shifted["frechet_distance"] > 0.1 and "class_accuracy" not in shifted
    assert sample_quality(clf, real, real + 0.5) == shifted


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(torch.randn(10), torch.randn(10, 3))
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(torch.randn(10, 2), torch.randn(10, 2), method="svd")
    with pytest.raises(ValueError, match="k="):
        precision_recall(torch.randn(5, 2), torch.randn(5, 2), k=5)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="odd"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 1.0, window_size=4)

"""Image-generation metrics computed in a classifier's feature space, plus PSNR and SSIM.

All statistics run in float64 on CPU. Features come from ``DigitClassifier.features`` (or any
[N, D] embedding); ``SampleEvaluator`` (or one-shot ``sample_quality``) bundles the metrics every
diffusion method reports.

- ``frechet_distance``: ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2}) (FID's formula, here on
  the small classifier's features rather than Inception's, so values are not comparable to FID).
- ``precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019), k-NN balls.
- ``classifier_accuracy``: do class-conditional samples show the class they were asked for?
- ``per_class_diversity``: mean pairwise feature distance within each class (mode collapse shows).
- ``psnr`` / ``ssim``: reconstruction fidelity (SSIM with a Gaussian window, Wang et al. 2004).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, D]; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples; got {x.shape[0]}")
    return x.detach().to("cpu", torch.float64)


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(dim=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def _trace_sqrt_product_eigh(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """tr((C_a C_b)^{1/2}) = tr((A^{1/2} C_b A^{1/2})^{1/2}) with A^{1/2} from eigh: the inner
    matrix is symmetric PSD, so its square root's trace is the sum of sqrt(eigenvalues)."""
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    inner = sqrt_a @ cov_b @ sqrt_a
    inner = (inner + inner.T) / 2
    return float(torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum())


def _trace_sqrt_product_scipy(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    import scipy.linalg

    root = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
    return float(root.real.trace())


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, method: str = "auto") -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D], [N_b, D] (float64,
    unbiased covariances). method: "scipy" (scipy.linalg.sqrtm of C_a C_b, as pytorch-fid does),
    "eigh" (symmetric eigendecompositions, no scipy needed, never complex) or "auto" (scipy if
    installed, else eigh). The result is clamped at 0 (round-off can make it slightly negative)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if method not in ("auto", "scipy", "eigh"):
        raise ValueError(f"method={method!r}: choose 'auto', 'scipy' or 'eigh'")
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401
            method = "scipy"
        except ImportError:
            method = "eigh"
    mu_a, cov_a = _mean_cov(a)
    mu_b, cov_b = _mean_cov(b)
    trace_sqrt = (_trace_sqrt_product_scipy if method == "scipy" else _trace_sqrt_product_eigh)(cov_a, cov_b)
    distance = float((mu_a - mu_b).pow(2).sum()) + float(torch.trace(cov_a) + torch.trace(cov_b)) - 2 * trace_sqrt
    return max(distance, 0.0)


@torch.no_grad()
def _batched_eval(classifier: nn.Module, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn(images[s:s+batch_size]) in eval mode over all batches, on the classifier's device; results on CPU."""
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        out = [fn(images[s:s + batch_size].to(device, torch.float32)).cpu()
               for s in range(0, images.shape[0], batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(out)


def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Arg-max class of each image (eval mode, batched), int64 on CPU."""
    return _batched_eval(classifier, lambda x: classifier(x).argmax(dim=-1), images, batch_size)


def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of images the classifier assigns to their label."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got {tuple(labels.shape)}")
    return float((predict(classifier, images, batch_size) == labels.cpu()).double().mean())


def extract_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """classifier.features(images) in eval mode, batched; float64 on CPU."""
    return _batched_eval(classifier, lambda x: classifier.features(x).double(), images, batch_size)


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself comes first


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    inside = 0
    for s in range(0, points.shape[0], chunk):
        dist = torch.cdist(points[s:s + chunk], centres)
        inside += int((dist <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(feats_real: torch.Tensor, feats_fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): each set's manifold is the union of
    balls around its points with radius = distance to the k-th nearest neighbour in the same set.
    precision = share of fakes inside the real manifold; recall = share of reals inside the fake one."""
    real, fake = _features(feats_real, "feats_real"), _features(feats_fake, "feats_fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if not isinstance(k, int) or k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k={k!r} must be an integer in [1, min(N_real, N_fake) - 1]")
    precision = _fraction_inside(fake, real, _kth_neighbour_radius(real, k))
    recall = _fraction_inside(real, fake, _kth_neighbour_radius(fake, k))
    return {"precision": precision, "recall": recall}


def per_class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean pairwise Euclidean feature distance among samples of the same class.
    Returns {"mean": average over classes, "per_class": {class: value}}; classes with < 2 samples are skipped."""
    x = _features(feats, "feats")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be [N] = [{x.shape[0]}]; got {tuple(labels.shape)}")
    per_class: dict[int, float] = {}
    for cls in labels.unique().tolist():
        members = x[labels.cpu() == cls]
        m = members.shape[0]
        if m < 2:
            continue
        per_class[int(cls)] = float(torch.pdist(members).sum() * 2 / (m * (m - 1)))
    if not per_class:
        raise ValueError("per_class_diversity needs at least one class with 2 or more samples")
    return {"mean": sum(per_class.values()) / len(per_class), "per_class": per_class}


# ---------------------------------------------------------------------------------------------
# Pixel-space fidelity
# ---------------------------------------------------------------------------------------------

def _pair_images(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W]; got {tuple(a.shape)}")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def _reduce(values: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(values.mean())
    if reduction == "none":
        return values
    raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float, reduction: str = "mean"):
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE), in dB; identical images
    give inf. data_range is max - min of the pixel scale (2 for [-1, 1], 1 for [0, 1])."""
    if not data_range > 0:
        raise ValueError(f"data_range={data_range} must be > 0")
    x, y = _pair_images(a, b)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return _reduce(10 * torch.log10(data_range ** 2 / mse), reduction)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length `size` (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) per image, averaged over channels and positions.

    Local means, variances and covariance use a Gaussian window (11 taps, sigma 1.5) over 'valid'
    positions only (no padding, like the reference MATLAB code). Images smaller than the window
    (8x8 digits) use the largest odd window that fits, with sigma scaled by the same ratio.
    """
    if not data_range > 0:
        raise ValueError(f"data_range={data_range} must be > 0")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size={window_size} must be a positive odd integer")
    x, y = _pair_images(a, b)
    n, c, h, w = x.shape
    size = min(window_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"images of {h}x{w} are too small for SSIM")
    g = gaussian_window(size, sigma * size / window_size)
    kernel = torch.outer(g, g).expand(c, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return _reduce(ssim_map.flatten(1).mean(dim=1), reduction)


# ---------------------------------------------------------------------------------------------
# The bundle every diffusion method reports
# ---------------------------------------------------------------------------------------------

class SampleEvaluator:
    """Scores generated images against a fixed real set in one classifier's feature space.

    Holds the classifier and the real features (extracted once), so every method and every
    checkpoint is measured with the same yardstick:

        evaluator = SampleEvaluator(train_classifier(train_x, train_y, seed=0), test_x)
        metrics = evaluator(samples, labels)   # frechet_distance, precision, recall, class_accuracy, ...
    """

    def __init__(self, classifier: nn.Module, real_images: torch.Tensor, k: int = 3):
        self.classifier, self.k = classifier, k
        self.real_features = extract_features(classifier, real_images)
        self.real_diversity = per_class_diversity(self.real_features, predict(classifier, real_images))["mean"]

    def __call__(self, fake_images: torch.Tensor, fake_labels: torch.Tensor | None = None) -> dict[str, float]:
        """Frechet distance, precision/recall (k-NN) and, for class-conditional samples, the
        classifier's accuracy on them and their mean within-class diversity, next to the real set's
        own within-class diversity (under the classifier's labels) as the yardstick. Compare methods
        only at equal sample counts: the Frechet distance is biased upward for small sets."""
        fake = extract_features(self.classifier, fake_images)
        out = {"frechet_distance": frechet_distance(self.real_features, fake),
               **precision_recall(self.real_features, fake, self.k),
               "num_real": float(self.real_features.shape[0]), "num_fake": float(fake.shape[0])}
        if fake_labels is not None:
            out["class_accuracy"] = classifier_accuracy(self.classifier, fake_images, fake_labels)
            out["diversity"] = per_class_diversity(fake, fake_labels)["mean"]
            out["real_diversity"] = self.real_diversity
        return out


def sample_quality(classifier: nn.Module, real_images: torch.Tensor, fake_images: torch.Tensor,
                   fake_labels: torch.Tensor | None = None, k: int = 3) -> dict[str, float]:
    """One-shot ``SampleEvaluator(classifier, real_images, k)(fake_images, fake_labels)``."""
    return SampleEvaluator(classifier, real_images, k)(fake_images, fake_labels)

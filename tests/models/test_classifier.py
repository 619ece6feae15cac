import pytest
import torch

from fewer.eval import classifier_accuracy, extract_features
from fewer.models import DigitClassifier, train_classifier
from fewer.models.classifier import _random_shift

from .tolerances import TOLERANCES


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def test_shapes_for_8_and_28_pixel_inputs():
    for size in (8, 28, 32):
        model = DigitClassifier(size)
        x = torch.randn(3, 1, size, size)
        assert model(x).shape == (3, 10) and model.features(x).shape == (3, 128)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        DigitClassifier(8)(torch.randn(2, 1, 28, 28))


def test_random_shift_moves_content_and_pads_with_background():
    x = -torch.ones(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0
    shifted = torch.cat([_random_shift(x, torch.Generator().manual_seed(s), 1) for s in range(30)])
    positions = {tuple(torch.nonzero(img[0] == 1.0)[0].tolist()) for img in shifted}
    assert positions <= {(3 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} and len(positions) > 3
    assert bool((shifted.sum(dim=(1, 2, 3)) == -62.0).all())  # one bright pixel kept, background -1


def test_training_is_deterministic_for_a_seed(digits):
    train_x, train_y, _, _ = digits
    a = train_classifier(train_x, train_y, steps=5, seed=3, width=8)
    b = train_classifier(train_x, train_y, steps=5, seed=3, width=8)
    c = train_classifier(train_x, train_y, steps=5, seed=4, width=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_classifier_reaches_the_accuracy_floor_on_sklearn_digits(digits):
    train_x, train_y, test_x, test_y = digits
    model = train_classifier(train_x, train_y, steps=400, seed=0, width=16)
    accuracy = classifier_accuracy(model, test_x, test_y)
    assert accuracy >= TOLERANCES["digits_classifier_accuracy"], accuracy
    assert not model.training
    feats = extract_features(model, test_x)
    assert feats.shape == (len(test_x), 128) and feats.dtype == torch.float64


def test_bad_training_inputs():
    with pytest.raises(ValueError, match=r"\[N, C, S, S\]"):
        train_classifier(torch.randn(4, 8, 8), torch.zeros(4, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(torch.randn(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), steps=1)

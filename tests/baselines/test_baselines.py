import math

import pytest
import torch

from fewer.baselines import (DigitsBaselineConfig, LMBaselineConfig, evaluate_lm, run_digits_baseline,
                             run_lm_baseline)
from fewer.core import ConfigError


def test_lm_baseline_learns_shakespeare():
    """A few dozen steps already beat the unigram-free start: validation loss falls well below log(V)."""
    cfg = LMBaselineConfig.from_preset("cpu", steps=40, warmup_steps=5, eval_every=40, eval_batches=4, batch_size=8, seq_len=64)
    result = run_lm_baseline(cfg, progress=False)
    assert math.isfinite(result.val_loss)
    assert result.val_loss < math.log(4096) - 1.0
    assert result.val_ppl == pytest.approx(math.exp(result.val_loss))
    train_rows = [r for r in result.history if r.get("kind") == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_evaluate_lm_matches_hand_computed_cross_entropy():
    class Uniform(torch.nn.Module):
        def forward(self, x, y):
            logits = torch.zeros(*x.shape, 16)
            return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    tokens = torch.randint(0, 16, (200,)).numpy().astype("uint16")
    out = evaluate_lm(Uniform(), tokens, seq_len=10, batch_size=4, max_batches=None, device="cpu")
    assert out["val_loss"] == pytest.approx(math.log(16))


def test_digits_baseline_runs_end_to_end_and_scores_samples():
    cfg = DigitsBaselineConfig.from_preset("cpu", steps=30, warmup_steps=5, classifier_steps=60, num_samples=40, sample_steps=4,
                                           batch_size=32)
    result = run_digits_baseline(cfg, progress=False)
    m = result.metrics
    assert result.samples.shape == (40, 1, 8, 8) and result.samples.abs().max() <= 1
    assert torch.equal(result.labels, torch.arange(40) % 10)
    for key in ("class_accuracy", "frechet_distance", "precision", "recall", "classifier_test_accuracy"):
        assert math.isfinite(m[key])
    assert m["classifier_test_accuracy"] > 0.5
    # the real-vs-real yardstick must score better than a 30-step model's samples
    assert m["real_frechet_distance"] < m["frechet_distance"]


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "huge"}, "LMBaselineConfig.model='huge'"),
    ({"seq_len": 0}, "LMBaselineConfig.seq_len=0"),
    ({"device": "tpu"}, "LMBaselineConfig.device='tpu'"),
])
def test_lm_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LMBaselineConfig(**kwargs)


def test_digits_config_rejects_a_model_of_the_wrong_image_size():
    with pytest.raises(ValueError, match="takes 32x32 images, the dataset gives 8x8"):
        DigitsBaselineConfig(dataset="digits", model="mnist")
    with pytest.raises(ConfigError, match="dataset='cifar'"):
        DigitsBaselineConfig(dataset="cifar")

import math

import pytest

from fewer.train import TrainConfig, lr_at

from .tolerances import TOLERANCES

TOL = TOLERANCES["schedule_abs"]


def approx(value):
    return pytest.approx(value, abs=TOL)


def test_warmup_is_linear_and_never_zero():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg) for s in range(6)] == [approx(v) for v in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]


def test_cosine_runs_from_peak_after_warmup_to_min_at_the_last_update():
    cfg = TrainConfig(steps=13, lr=2.0, min_lr_ratio=0.1, warmup_steps=2, schedule="cosine")
    # updates 2..12 span the half cosine: 10 intervals
    assert lr_at(1, cfg) == approx(2.0)
    assert lr_at(2, cfg) == approx(2.0)
    assert lr_at(7, cfg) == approx(0.2 + 1.8 * 0.5)                                  # the midpoint
    assert lr_at(4, cfg) == approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(12, cfg) == approx(0.2)
    assert lr_at(500, cfg) == approx(0.2)                                            # held after the end
    values = [lr_at(s, cfg) for s in range(2, 13)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    cfg = TrainConfig(steps=20, lr=1.0, min_lr_ratio=0.0, warmup_steps=2, schedule="wsd", decay_fraction=0.25)
    assert cfg.decay_steps == 5
    assert lr_at(0, cfg) == approx(0.5)
    assert [lr_at(s, cfg) for s in range(2, 15)] == [approx(1.0)] * 13
    assert [lr_at(s, cfg) for s in range(15, 20)] == [approx(v) for v in (0.8, 0.6, 0.4, 0.2, 0.0)]


def test_wsd_with_a_floor():
    cfg = TrainConfig(steps=10, lr=1.0, min_lr_ratio=0.5, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, cfg) for s in (7, 8, 9)] == [approx(1.0), approx(0.75), approx(0.5)]


def test_single_step_runs_use_the_peak_or_warmup():
    assert lr_at(0, TrainConfig(steps=1, lr=0.3, schedule="cosine")) == approx(0.3)
    assert lr_at(0, TrainConfig(steps=1, lr=0.3, warmup_steps=1)) == approx(0.3)


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step_is_refused(step):
    with pytest.raises(ValueError, match="non-negative integer"):
        lr_at(step, TrainConfig())

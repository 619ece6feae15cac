import pytest

from fewer.core import ConfigError
from fewer.train import TrainConfig


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "positive integer"),
    ("steps", 2.5, "integer"),
    ("lr", 0.0, "lr=0.0"),
    ("lr", float("nan"), "finite"),
    ("min_lr_ratio", 1.5, r"\[0.0, 1.0\]"),
    ("warmup_steps", -1, "warmup_steps"),
    ("warmup_steps", 2000, "warmup_steps"),      # more than steps=1000
    ("schedule", "linear", "'cosine', 'wsd', 'constant'"),
    ("decay_fraction", 0.0, "decay_fraction"),
    ("weight_decay", -0.1, "weight_decay"),
    ("beta1", 1.0, "beta1"),
    ("beta2", -0.5, "beta2"),
    ("eps", 0.0, "eps"),
    ("grad_clip", -1.0, "grad_clip"),
    ("grad_accum", 0, "positive integer"),
    ("precision", "fp16", "'auto', 'bf16', 'fp32'"),
    ("device", "tpu", "'auto', 'cpu', 'cuda'"),
    ("eval_every", -5, "eval_every"),
    ("log_every", 0, "positive integer"),
    ("seed", -1, "seed"),
    ("resume", "yes", "'auto', 'never'"),
    ("distributed", "deepspeed", "'none', 'ddp', 'fsdp2'"),
    ("on_nonfinite", "ignore", "'raise', 'skip'"),
    ("progress", "yes", "True or False"),
])
def test_bad_values_raise_config_error_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}=" in str(info.value)


def test_checkpoints_need_an_out_dir():
    with pytest.raises(ConfigError, match="ckpt_every=5.*out_dir"):
        TrainConfig(ckpt_every=5)
    TrainConfig(ckpt_every=5, out_dir="runs/x")


def test_wsd_warmup_and_decay_must_fit_in_steps():
    with pytest.raises(ConfigError, match="warmup plus the 5 decay steps"):
        TrainConfig(steps=10, schedule="wsd", warmup_steps=6, decay_fraction=0.5)
    TrainConfig(steps=10, schedule="wsd", warmup_steps=5, decay_fraction=0.5)


def test_decay_steps_round_up_without_float_noise():
    assert TrainConfig(steps=30, schedule="wsd", decay_fraction=0.1).decay_steps == 3  # 0.1*30 = 3.0000000000000004
    assert TrainConfig(steps=10, schedule="wsd", decay_fraction=0.25).decay_steps == 3
    assert TrainConfig(steps=10, schedule="wsd", decay_fraction=0.01).decay_steps == 1


def test_round_trips_through_json_and_presets():
    cfg = TrainConfig(steps=7, lr=1e-3, schedule="wsd", decay_fraction=0.5, distributed="fsdp2", progress=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    smoke = TrainConfig.from_preset("smoke", lr=0.5)
    assert smoke.steps == 20 and smoke.lr == 0.5 and not smoke.progress

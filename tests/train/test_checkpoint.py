import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewer.train import TrainConfig, latest_checkpoint, load_model_weights, train
from fewer.train.checkpoint import rng_state, set_rng_state
from fewer.train.examples import StopAt

QUIET = dict(progress=False, device="cpu")
COMPARED_ROW_KEYS = ("kind", "step", "loss", "lr", "grad_norm", "skipped")


class NoisyNet(nn.Module):
    """Dropout draws from torch's RNG, so a resume that loses the RNG state cannot be bit-exact."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16)])
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for layer in self.layers:
            x = self.drop(F.gelu(layer(x)))
        return self.head(x)


def get_batch(step, rank, world_size):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(12, 8, generator=g)
    # a little noise from the global RNGs too (as a careless data pipeline would): resume restores them
    noise = 0.01 * torch.randn(12, 1) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    return x, x[:, :1].sin() + noise


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def eval_fn(model):
    x, y = get_batch(10_000, 0, 1)   # uses the global RNGs as well
    return {"loss": F.mse_loss(model(x), y).item()}


def fresh_model(seed):
    torch.manual_seed(seed)
    return NoisyNet()


def run(out_dir, steps=12, model_seed=0, callbacks=(), **overrides):
    fields = dict(steps=steps, lr=1e-2, warmup_steps=2, schedule="cosine", log_every=2, eval_every=3,
                  ckpt_every=4, out_dir=str(out_dir), **QUIET)
    cfg = TrainConfig(**{**fields, **overrides})
    model = fresh_model(model_seed)
    result = train(model, loss_fn, get_batch, cfg, eval_fn=eval_fn, callbacks=callbacks)
    return model, result


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs"


def comparable(rows):
    return [{k: r.get(k) for k in COMPARED_ROW_KEYS} for r in rows]


def test_resume_after_preemption_is_bit_exact(tmp_path):
    whole, whole_result = run(tmp_path / "whole")
    _, stopped = run(tmp_path / "resumed", callbacks=[StopAt(6)])       # stops between the checkpoints at 4 and 8
    assert stopped.stopped_early and stopped.step == 6
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    # a different initialisation proves the weights come from the checkpoint
    resumed, resumed_result = run(tmp_path / "resumed", model_seed=99)
    assert_same_params(resumed, whole)
    assert comparable(resumed_result.history) == comparable(whole_result.history)
    on_disk = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert comparable(on_disk) == comparable(whole_result.history)


def test_without_rng_restore_the_resume_differs(tmp_path, monkeypatch):
    """The bit-exact test above can fail: skip restoring the RNG streams and the weights differ."""
    whole, _ = run(tmp_path / "whole")
    run(tmp_path / "resumed", callbacks=[StopAt(6)])
    monkeypatch.setattr("fewer.train.checkpoint.set_rng_state", lambda state: None)
    resumed, _ = run(tmp_path / "resumed")
    assert not all(torch.equal(p, q) for p, q in zip(resumed.parameters(), whole.parameters()))


def test_extending_a_constant_schedule_run_equals_one_long_run(tmp_path):
    whole, _ = run(tmp_path / "whole", steps=10, schedule="constant")
    run(tmp_path / "two_calls", steps=4, schedule="constant")
    extended, result = run(tmp_path / "two_calls", steps=10, schedule="constant", model_seed=7)
    assert_same_params(extended, whole)
    assert [r["step"] for r in result.history if r["kind"] == "train"] == [2, 4, 6, 8, 10]


def test_resume_never_starts_afresh(tmp_path):
    run(tmp_path, steps=8)
    model, result = run(tmp_path, steps=8, resume="never", model_seed=3)
    reference, _ = run(tmp_path / "other", steps=8, model_seed=3)
    assert_same_params(model, reference)
    assert result.history[0]["step"] == 2


def test_finished_run_resumes_to_nothing(tmp_path):
    done, first = run(tmp_path, steps=8)
    again, second = run(tmp_path, steps=8, model_seed=5)
    assert_same_params(again, done)
    assert second.step == 8 and second.final == first.final


def test_keep_last_prunes_and_latest_points_to_newest(tmp_path):
    run(tmp_path, steps=12, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008", "step_00000012"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000012"
    meta = json.loads((tmp_path / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 1 and meta["config"]["steps"] == 12


def test_changed_config_on_resume_warns(tmp_path):
    run(tmp_path, steps=8, callbacks=[StopAt(4)])
    with pytest.warns(UserWarning, match=r"lr: 0.01 -> 0.02"):
        run(tmp_path, steps=8, lr=2e-2)


def test_load_model_weights_for_evaluation(tmp_path):
    trained, _ = run(tmp_path, steps=8)
    loaded = load_model_weights(fresh_model(42), latest_checkpoint(tmp_path))
    assert_same_params(loaded, trained)
    with pytest.raises(FileNotFoundError, match="not a complete fewer checkpoint"):
        load_model_weights(fresh_model(42), tmp_path)


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_evaluation_does_not_change_the_training_trajectory(tmp_path):
    with_eval, _ = run(tmp_path / "a", steps=8, eval_every=3)
    without_eval, _ = run(tmp_path / "b", steps=8, eval_every=1)
    assert_same_params(with_eval, without_eval)


def test_pruning_keeps_the_new_run_after_resume_never(tmp_path):
    run(tmp_path, steps=12)                                    # leaves step 8 and 12
    run(tmp_path, steps=8, resume="never", keep_last=1)        # a new run: its step 4, then 8, must survive
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008"]
    assert latest_checkpoint(tmp_path).name == "step_00000008"

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewer.core import rel_l2
from fewer.train import NonFiniteLossError, TrainConfig, lr_at, param_groups, train
from fewer.train.examples import SyntheticRegression, TinyRegressor
from fewer.train.loop import resolve_precision

from .tolerances import TOLERANCES

QUIET = dict(progress=False, device="cpu")


def tiny_setup(seed=0, **task):
    torch.manual_seed(seed)
    return TinyRegressor(width=16, depth=2), SyntheticRegression(global_batch=16, **task)


def test_loss_decreases_on_a_tiny_problem():
    model, task = tiny_setup()
    before = task.eval_fn(model)["loss"]
    cfg = TrainConfig(steps=40, lr=3e-3, warmup_steps=4, log_every=5, **QUIET)
    result = train(model, task.loss_fn, task.get_batch, cfg, eval_fn=task.eval_fn)
    train_rows = [r for r in result.history if r["kind"] == "train"]
    factor = TOLERANCES["loss_drop_factor"]
    assert train_rows[-1]["loss"] < factor * train_rows[0]["loss"]
    assert result.final["eval_loss"] < factor * before
    assert result.step == 40 and result.out_dir is None and not result.stopped_early


def test_metrics_jsonl_config_and_env_files(tmp_path):
    model, task = tiny_setup()
    cfg = TrainConfig(steps=12, lr=1e-3, warmup_steps=2, log_every=5, eval_every=6, out_dir=str(tmp_path), **QUIET)
    result = train(model, task.loss_fn, task.get_batch, cfg, eval_fn=task.eval_fn)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(result.history))
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [5, 10, 12]               # every log_every, and the last step
    assert [r["step"] for r in eval_rows] == [6, 12]
    for row in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s", "skipped"} <= set(row)
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, cfg))
        assert row["samples_per_s"] > 0 and row["grad_norm"] > 0
    assert set(eval_rows[0]) == {"kind", "step", "loss"}
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    env = json.loads((tmp_path / "env.json").read_text())
    assert {"torch", "python", "commit", "device", "world_size", "precision"} <= set(env)
    assert result.final["step"] == 12 and result.final["eval_loss"] == eval_rows[-1]["loss"]


def test_extra_metrics_are_averaged_and_tokens_become_throughput():
    model, task = tiny_setup()

    def loss_fn(model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        return loss, {"double_loss": 2 * loss.detach(), "tokens": x.shape[0] * 10}

    cfg = TrainConfig(steps=4, lr=1e-3, log_every=4, **QUIET)
    row = train(model, loss_fn, task.get_batch, cfg).history[-1]
    assert row["double_loss"] == pytest.approx(2 * row["loss"], rel=1e-6)
    assert row["tokens_per_s"] == pytest.approx(10 * row["samples_per_s"])
    assert "tokens" not in row


def test_gradient_accumulation_matches_the_whole_batch():
    results = []
    for grad_accum in (1, 4):
        model, task = tiny_setup()

        def loss_fn(model, batch):
            x, y = batch
            loss = F.mse_loss(model(x), y)
            return loss, {"double_loss": 2 * loss.detach(), "tokens": x.shape[0] * 10}

        cfg = TrainConfig(steps=5, lr=1e-3, log_every=1, grad_accum=grad_accum, **QUIET)
        history = train(model, loss_fn, task.get_batch, cfg).history
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), history))
    (whole, whole_rows), (accumulated, accumulated_rows) = results
    tol = TOLERANCES["grad_accum_rel"]
    assert rel_l2(accumulated, whole) <= tol
    for a, w in zip(accumulated_rows, whole_rows):
        for key in ("loss", "grad_norm", "double_loss"):
            assert a[key] == pytest.approx(w[key], rel=tol)
        assert a["tokens_per_s"] == pytest.approx(10 * a["samples_per_s"])  # tokens are summed, not averaged


def test_gradient_accumulation_must_divide_the_batch():
    model, task = tiny_setup()
    with pytest.raises(ValueError, match="grad_accum=3 must divide the batch's leading dimension"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, grad_accum=3, **QUIET))


def grad_norm_after_clipping(model):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_grad_clip_clips_the_global_norm_and_logs_it_before_clipping(grad_clip):
    model, task = tiny_setup()
    seen = []
    cfg = TrainConfig(steps=3, lr=1e-3, log_every=1, grad_clip=grad_clip, **QUIET)
    train(model, task.loss_fn, task.get_batch, cfg,
          callbacks=[lambda s: seen.append((s.row["grad_norm"], grad_norm_after_clipping(s.model)))])
    for logged, after in seen:
        assert logged > 0.05  # this problem's gradients are larger than the clip, so clipping is active
        expected = min(logged, grad_clip) if grad_clip else logged
        assert after == pytest.approx(expected, rel=TOLERANCES["clip_rel"])


def test_clipped_sgd_update_has_length_lr_times_clip():
    model, task = tiny_setup()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(steps=1, lr=0.1, schedule="constant", grad_clip=0.01, **QUIET)
    result = train(model, task.loss_fn, task.get_batch, cfg,
                   optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=123.0))   # lr is set by the schedule
    assert result.final["grad_norm"] > 0.01
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.1 * 0.01, rel=1e-4)


def test_weight_decay_only_on_matrices():
    model = TinyRegressor(width=8, depth=1)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_scale_multiplies_the_schedule_per_group():
    model, task = tiny_setup()
    seen = []
    cfg = TrainConfig(steps=2, lr=1e-3, schedule="constant", **QUIET)

    def make(m):
        groups = param_groups(m, 0.0)
        groups[1]["lr_scale"] = 0.5
        return torch.optim.AdamW(groups)

    train(model, task.loss_fn, task.get_batch, cfg, optimizer=make,
          callbacks=[lambda s: seen.append([g["lr"] for g in s.optimizer.param_groups])])
    assert seen == [[1e-3, 5e-4]] * 2


@pytest.mark.parametrize("precision, autocast_on", [("auto", False), ("fp32", False), ("bf16", True)])
def test_precision_on_cpu(precision, autocast_on):
    model, task = tiny_setup()
    seen = []

    def loss_fn(model, batch):
        x, y = batch
        out = model(x)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return F.mse_loss(out.float(), y)

    train(model, loss_fn, task.get_batch, TrainConfig(steps=2, lr=1e-3, precision=precision, **QUIET))
    assert seen == [(autocast_on, torch.bfloat16 if autocast_on else torch.float32)] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_auto_precision_resolves_per_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def nan_at(bad_step, task):
    def get_batch(step, rank, world_size):
        x, y = task.get_batch(step, rank, world_size)
        return (x * float("nan"), y) if step == bad_step else (x, y)
    return get_batch


def test_nonfinite_loss_raises_with_the_step():
    model, task = tiny_setup()
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(the batch of get_batch\(3"):
        train(model, task.loss_fn, nan_at(3, task), TrainConfig(steps=6, lr=1e-3, **QUIET))


def test_nonfinite_loss_can_be_skipped_and_counted():
    model, task = tiny_setup()
    snapshots = {}

    def keep(state):
        snapshots[state.step] = [p.detach().clone() for p in state.model.parameters()]

    cfg = TrainConfig(steps=6, lr=1e-3, log_every=1, on_nonfinite="skip", **QUIET)
    result = train(model, task.loss_fn, nan_at(3, task), cfg, callbacks=[keep])
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))       # update index 3 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))
    assert [r["skipped"] for r in result.history] == [0, 0, 0, 1, 1, 1]
    assert result.history[3]["loss"] != result.history[3]["loss"]                    # nan: no update in that row
    with pytest.raises(NonFiniteLossError, match="more than max_skipped=0"):
        train(model, task.loss_fn, nan_at(1, task), cfg.replace(max_skipped=0))


def test_loss_must_be_a_scalar():
    model, task = tiny_setup()
    with pytest.raises(ValueError, match="scalar tensor"):
        train(model, lambda m, b: (m(b[0]) - b[1]) ** 2, task.get_batch, TrainConfig(steps=1, **QUIET))


def test_optimizer_must_hold_the_models_parameters():
    model, task = tiny_setup()
    foreign = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass a factory"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, **QUIET), optimizer=foreign)
    with pytest.raises(TypeError, match="factory returned"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, **QUIET), optimizer=lambda m: None)


def test_callbacks_can_stop_the_run():
    model, task = tiny_setup()
    result = train(model, task.loss_fn, task.get_batch, TrainConfig(steps=10, **QUIET),
                   callbacks=[lambda s: setattr(s, "stop", s.step == 3)])
    assert result.step == 3 and result.stopped_early


def test_progress_bar_runs(capsys):
    model, task = tiny_setup()
    cfg = TrainConfig(steps=3, lr=1e-3, log_every=1, device="cpu", progress=True)
    train(model, task.loss_fn, task.get_batch, cfg, eval_fn=task.eval_fn)
    assert "3/3" in capsys.readouterr().err


def test_distributed_modes_need_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model, task = tiny_setup()
    with pytest.raises(ValueError, match="must be launched by torchrun"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, distributed="ddp", **QUIET))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed='none' but 2 processes were launched"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, **QUIET))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_cuda_device_without_cuda_is_refused():
    model, task = tiny_setup()
    with pytest.raises(ValueError, match="no CUDA device"):
        train(model, task.loss_fn, task.get_batch, TrainConfig(steps=1, device="cuda", progress=False))


def test_fsdp_units_are_module_list_children_innermost_first():
    from fewer.train.distributed import fsdp_units

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Inner(), nn.Linear(2, 2)])
            self.head = nn.Linear(2, 2)

    model = Outer()
    units = fsdp_units(model)
    position = {id(u): i for i, u in enumerate(units)}
    assert len(units) == 4 and id(model.head) not in position
    for part in model.blocks[0].parts:           # children are sharded before the block that holds them
        assert position[id(part)] < position[id(model.blocks[0])]

    class Explicit(Outer):
        def fsdp_units(self):
            return [self.head]

    explicit = Explicit()
    assert fsdp_units(explicit) == [explicit.head]


def test_batches_in_containers_are_moved():
    from collections import namedtuple

    from fewer.train.loop import move_to

    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.ones(2), [torch.zeros(1), 3]), "b": "text"}
    moved = move_to(batch, torch.device("cpu"))
    assert isinstance(moved["a"], Pair) and moved["a"].y[1] == 3 and moved["b"] == "text"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEWER_RUN_SLOW") != "1",
                    reason="torch.compile on CPU takes minutes; run with FEWER_RUN_SLOW=1")
def test_compiled_model_trains_like_eager():
    histories = []
    for compile_model in (False, True):
        model, task = tiny_setup()
        cfg = TrainConfig(steps=4, lr=1e-3, log_every=1, compile=compile_model, **QUIET)
        histories.append([r["loss"] for r in train(model, task.loss_fn, task.get_batch, cfg).history])
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)

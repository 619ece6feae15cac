"""The one training loop every recipe uses: short, explicit, nanoGPT-ordered. No trainer framework.

    result = train(model, loss_fn, get_batch, TrainConfig(steps=200, lr=1e-3, out_dir="runs/x"),
                   eval_fn=eval_fn)

The caller owns the model, the loss and the data, joined by three small contracts:

- ``loss_fn(model, batch) -> loss`` or ``(loss, {name: value})``: a scalar to minimise, plus extra
  metrics (floats or 0-d tensors; the same names on every rank) that are averaged into the log rows.
  An extra named ``"tokens"`` is this rank's token count and becomes ``tokens_per_s`` instead.
  Call the model as ``model(...)``: DDP and FSDP2 hook its forward, not other methods.
- ``get_batch(step, rank, world_size) -> batch``: this rank's share of global batch ``step``, a pure
  function of its arguments (so resume needs no loader state, and N processes see the same global
  batch as one). Tensors anywhere in tuples, lists and dicts are moved to the device.
- ``eval_fn(model) -> {name: value}``: called on every rank in eval mode under ``torch.no_grad`` and
  the training autocast; values are averaged over ranks.

Per update ``step`` (0-based): set the learning rate from the schedule (times a param group's
``lr_scale``, default 1), fetch the batch, forward under autocast and backward (in ``grad_accum``
micro-batches, split along the leading dimension, if asked), global gradient norm
(logged before clipping), non-finite check (all ranks agree), clip, optimizer step. Then, after
``done = step + 1`` updates: log, evaluate, run callbacks, checkpoint, in that order. Evaluation
restores the RNG streams it used, so the training trajectory does not depend on eval_every.

Precision: "auto" is bf16 autocast on CUDA and fp32 on CPU; "bf16" autocasts on any device (CPU
included: torch supports it, it is slow but useful to test numerics); "fp32" never autocasts.
Parameters and optimizer state stay fp32 in every mode.

Non-finite loss or gradient norm: ``on_nonfinite="raise"`` (default) raises ``NonFiniteLossError``
naming the step (the argument given to ``get_batch``). ``"skip"`` drops that update (no optimizer
step; the schedule moves on), counts it in the log rows' ``skipped``, and raises once more than
``max_skipped`` updates were skipped in this call.

Costs we accept for clarity: one scalar all-reduce and one host sync per step (the loss and the
non-finite check). That is negligible for the models in this repository.

Files in ``cfg.out_dir`` (nothing is written when it is ""): ``config.json``, ``env.json``
(versions, device, git commit), ``metrics.jsonl`` and ``checkpoints/`` (see ``checkpoint.py``). A
metrics row is ``{"kind": "train", "step", "loss", "lr", "grad_norm", "samples_per_s",
["tokens_per_s"], "elapsed_s", "skipped", extras...}`` or ``{"kind": "eval", "step", metrics...}``:
``step`` counts updates done, ``loss`` and extras are means over the updates since the previous row,
``lr`` and ``grad_norm`` are the latest update's, throughput excludes evaluation and checkpoint time,
``elapsed_s`` is wall time since this call began. Non-finite numbers are written as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.seed import seed_everything
from . import checkpoint, distributed
from .config import TrainConfig
from .distributed import DistInfo, log0
from .schedules import lr_at

METRICS = "metrics.jsonl"
# Config fields that may change between a run and its resume without changing what is computed
RESUME_NEUTRAL_FIELDS = ("eval_every", "ckpt_every", "log_every", "keep_last", "progress", "resume",
                         "out_dir", "max_skipped", "compile")


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass
class TrainState:
    """What a callback ``cb(state)`` sees after each update; set ``state.stop = True`` to end the run
    (a checkpoint is then written if checkpointing is on, as when preempted)."""
    step: int                                # updates done
    model: nn.Module                         # as trained: possibly DDP-wrapped or FSDP2-sharded
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    info: DistInfo
    row: dict[str, Any] | None = None        # the train metrics row logged at this step, if any
    eval_row: dict[str, Any] | None = None   # the eval row of this step, if any
    stop: bool = False


@dataclasses.dataclass
class TrainResult:
    final: dict[str, Any]                    # last train row (+ last eval metrics as eval_<name>)
    history: list[dict[str, Any]]            # every metrics row of the run, including rows before a resume
    out_dir: Path | None
    step: int                                # updates done when train() returned
    stopped_early: bool = False              # a callback asked to stop


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], get_batch: Callable[[int, int, int], Any],
          cfg: TrainConfig, *, eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
          optimizer: torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          callbacks: Sequence[Callable[[TrainState], None]] = ()) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` updates (continuing from a checkpoint when ``cfg.resume="auto"``).

    ``optimizer``: None builds AdamW from the config (weight decay on >= 2-D parameters only); a
    factory ``optimizer(model)`` receives the wrapped model (required under FSDP2, which replaces the
    parameters); an instance must hold the model's own parameters. The process group, if this call
    started one, stays up for the caller (e.g. to gather weights); ``distributed.cleanup()`` ends it.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train: cfg must be a TrainConfig, got {type(cfg).__name__}")
    info = distributed.setup(cfg.distributed, cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    seed_everything(cfg.seed + info.rank)

    model = distributed.wrap_model(model.to(info.device), info)
    if cfg.compile:
        model.compile()  # in place: parameter names and state-dict keys stay those of the plain module
    optimizer = build_optimizer(model, cfg, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    resume_from = None
    if cfg.out_dir and cfg.resume == "auto":
        resume_from = checkpoint.latest_checkpoint(cfg.out_dir)
    start = 0
    if resume_from is not None:
        _warn_config_changes(checkpoint.read_meta(resume_from).get("config", {}), cfg, info)
        start = checkpoint.load_checkpoint(resume_from, model, optimizer, info)
    files = _RunFiles(cfg.out_dir, info)
    history = files.open(resume_step=start if resume_from is not None else None)
    files.write_json("config.json", lambda: cfg.to_dict())
    files.write_json("env.json", lambda: environment(info, precision))
    log0(info, f"training on {info.device} ({info.mode}, world size {info.world_size}), precision {precision}, "
               f"steps {start}..{cfg.steps}")

    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = _progress_bar(cfg, info, start)
    meter = _Meter(info)
    began = time.perf_counter()
    skipped = 0
    stopped = False
    done = start
    model.train()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            optimizer.zero_grad(set_to_none=True)  # here, not after the step, so callbacks can inspect grads
            batch = move_to(get_batch(step, info.rank, info.world_size), info.device)
            loss, extras = forward_backward(model, loss_fn, batch, cfg.grad_accum, autocast)
            grad_norm = global_grad_norm(params, info.device)
            global_loss = distributed.all_reduce_mean(loss.detach().float().reshape(1).clone())
            loss_value, norm_value = torch.cat([global_loss, grad_norm.float().reshape(1)]).tolist()
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                optimizer.step()
                meter.add(loss_value, extras, batch)
            else:
                skipped += 1
                problem = (f"non-finite training loss or gradient at step {step} (the batch of "
                           f"get_batch({step}, ...)): loss={loss_value}, grad_norm={norm_value}")
                if cfg.on_nonfinite == "raise":
                    raise NonFiniteLossError(problem + "; lower lr, check the data, or set on_nonfinite='skip'")
                if skipped > cfg.max_skipped:
                    raise NonFiniteLossError(f"{problem}; {skipped} updates skipped in this run, more than "
                                             f"max_skipped={cfg.max_skipped}")
                log0(info, problem + "; update skipped")
            meter.train_seconds += time.perf_counter() - t0
            done = step + 1
            last = done == cfg.steps
            if bar is not None:
                bar.update(1)

            state = TrainState(step=done, model=model, optimizer=optimizer, cfg=cfg, info=info)
            if done % cfg.log_every == 0 or last:
                state.row = meter.row(done, lr, norm_value, time.perf_counter() - began, skipped)
                history.append(state.row)
                files.append(state.row)
                _show(bar, info, state.row)
            if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
                state.eval_row = evaluate(model, eval_fn, autocast, info, done)
                history.append(state.eval_row)
                files.append(state.eval_row)
                _show(bar, info, state.eval_row)
            for callback in callbacks:
                callback(state)
            stop = distributed.any_rank(state.stop, info.device) if callbacks else False
            if cfg.ckpt_every and (done % cfg.ckpt_every == 0 or last or stop):
                checkpoint.save_checkpoint(cfg.out_dir, done, model, optimizer, info, cfg.to_dict(), cfg.keep_last)
            if stop:
                stopped = True
                log0(info, f"stopped by a callback after {done} updates")
                break
    finally:
        if bar is not None:
            bar.close()
        files.close()
    if start >= cfg.steps:
        log0(info, f"the checkpoint is at step {start} >= steps={cfg.steps}: nothing to train")
    return TrainResult(final=final_metrics(history), history=history,
                       out_dir=Path(cfg.out_dir) if cfg.out_dir else None, step=done, stopped_early=stopped)


# ---- pieces of the loop (public so recipes can reuse them) ----
def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere; bf16 on a CUDA device without bf16 support is an error."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp32'")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r} is not allowed: choose 'auto', 'bf16' or 'fp32'")
    return precision


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices and embeddings (>= 2-D) only; biases and norm gains (1-D)
    get none. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, optimizer: Any = None) -> torch.optim.Optimizer:
    if optimizer is None:
        groups = param_groups(model, cfg.weight_decay)
        if not groups:
            raise ValueError("train: the model has no parameters with requires_grad=True")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"train: optimizer must be None, an Optimizer or a factory optimizer(model), "
                            f"got {type(optimizer).__name__}")
        optimizer = optimizer(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"train: the optimizer factory returned {type(optimizer).__name__}, not an Optimizer")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("train: the optimizer holds parameters that are not the model's; under FSDP2 the "
                         "parameters are replaced when the model is sharded, so pass a factory: "
                         "optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=...)")
    return optimizer


def forward_backward(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], batch: Any, grad_accum: int,
                     autocast: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Accumulate the gradients of ``batch`` in ``grad_accum`` equal micro-batches (gradients are reduced
    across ranks only after the last). Returns the mean loss and the extras averaged over micro-batches
    ("tokens" summed). For a loss that is a mean over samples this is the gradient of the whole batch."""
    loss_sum: torch.Tensor | None = None
    extras_sum: dict[str, Any] = {}
    for index, micro in enumerate(split_batch(batch, grad_accum)):
        with distributed.gradient_sync(model, enabled=index == grad_accum - 1):
            with autocast:
                loss, extras = split_loss_output(loss_fn(model, micro))
            (loss / grad_accum if grad_accum > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for name, value in extras.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            extras_sum[name] = extras_sum[name] + value if name in extras_sum else value
    if grad_accum == 1:
        return loss_sum, extras_sum
    mean_extras = {name: value if name == "tokens" else value / grad_accum for name, value in extras_sum.items()}
    return loss_sum / grad_accum, mean_extras


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``parts`` micro-batches: every tensor is split along its leading dimension (which ``parts`` must
    divide); 0-d tensors and other values are shared by all micro-batches."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return [batch] * parts
        if batch.shape[0] % parts:
            raise ValueError(f"grad_accum={parts} must divide the batch's leading dimension, got a tensor of shape "
                             f"{tuple(batch.shape)}")
        return list(batch.split(batch.shape[0] // parts))
    if isinstance(batch, dict):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        split = [split_batch(v, parts) for v in batch]
        return [_rebuild(batch, [v[i] for v in split]) for i in range(parts)]
    return [batch] * parts


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [move_to(v, device) for v in batch])
    return batch


def _rebuild(like: list | tuple, items: list[Any]) -> Any:
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)  # namedtuples take fields


def split_loss_output(output: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        loss, extras = output
    else:
        loss, extras = output, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor or (scalar tensor, dict of metrics), got {shape}; "
                         "reduce the loss (e.g. .mean())")
    return loss.reshape(()), extras


def global_grad_norm(params: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients together, the same on every rank (FSDP2 shards are combined)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor holding partial norms of the shards
        norm = norm.full_tensor()
    return norm


def evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], dict[str, Any]], autocast: Any, info: DistInfo,
             step: int) -> dict[str, Any]:
    """Run ``eval_fn`` on every rank and average its metrics. The RNG streams are restored afterwards, so
    evaluation (its cadence included) never changes the training trajectory."""
    rng = checkpoint.rng_state()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            metrics = eval_fn(model)
    finally:
        model.train()
        checkpoint.set_rng_state(rng)
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"eval_fn must return a non-empty dict of metrics, got {metrics!r}")
    names = sorted(metrics)
    values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=info.device)
    values = distributed.all_reduce_mean(values).tolist()
    return {"kind": "eval", "step": step, **dict(zip(names, values))}


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    train_rows = [r for r in history if r.get("kind") == "train"]
    eval_rows = [r for r in history if r.get("kind") == "eval"]
    if train_rows:
        final.update({k: v for k, v in train_rows[-1].items() if k != "kind"})
    if eval_rows:
        final.update({f"eval_{k}": v for k, v in eval_rows[-1].items() if k not in ("kind", "step")})
    return final


def environment(info: DistInfo, precision: str) -> dict[str, Any]:
    """What env.json records: versions, device and git commit (from fewer.bench), plus the run's layout."""
    from .. import __version__
    from ..bench import environment as bench_environment

    env: dict[str, Any] = dict(bench_environment())
    env.update(python=platform.python_version(), numpy=np.__version__, fewer=__version__,
               hostname=socket.gethostname(), argv=list(sys.argv), precision=precision,
               **distributed.describe(info))
    return env


# ---- helpers ----
class _Meter:
    """Sums over the updates since the last row; one all-reduce per row for the extras."""

    def __init__(self, info: DistInfo):
        self.info = info
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = 0.0
        self.updates = 0
        self.samples = 0
        self.tokens = 0.0
        self.extras: dict[str, torch.Tensor] = {}
        self.train_seconds = 0.0

    def add(self, loss: float, extras: dict[str, Any], batch: Any) -> None:
        self.loss_sum += loss
        self.updates += 1
        self.samples += _leading_dim(batch) * self.info.world_size
        for name, value in extras.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            if name == "tokens":
                self.tokens += float(value) * self.info.world_size  # per-rank count; ranks assumed alike
                continue
            value = value.to(self.info.device).reshape(())
            self.extras[name] = self.extras[name] + value if name in self.extras else value

    def row(self, step: int, lr: float, grad_norm: float, elapsed: float, skipped: int) -> dict[str, Any]:
        seconds = max(self.train_seconds, 1e-9)
        row: dict[str, Any] = {"kind": "train", "step": step,
                               "loss": self.loss_sum / self.updates if self.updates else float("nan"),
                               "lr": lr, "grad_norm": grad_norm, "samples_per_s": self.samples / seconds}
        if self.tokens:
            row["tokens_per_s"] = self.tokens / seconds
        row.update(elapsed_s=elapsed, skipped=skipped)
        if self.extras:
            names = sorted(self.extras)
            means = distributed.all_reduce_mean(torch.stack([self.extras[n] for n in names]) / max(self.updates, 1))
            row.update(zip(names, means.tolist()))
        self._reset()
        return row


def _leading_dim(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _leading_dim(item)
        if n:
            return n
    return 0


class _RunFiles:
    """config.json, env.json and metrics.jsonl in out_dir, written by rank 0 only."""

    def __init__(self, out_dir: str, info: DistInfo):
        self.dir = Path(out_dir) if out_dir else None
        self.info = info
        self.handle = None

    def open(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Start metrics.jsonl afresh, or on resume keep its rows up to the checkpoint's step (rows
        after it belong to updates that are redone). Returns the kept rows."""
        if self.dir is None:
            return []
        path = self.dir / METRICS
        rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= resume_step:
                        rows.append(row)
        distributed.barrier(self.info)  # every rank has read the file before rank 0 rewrites it
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.writelines(_to_json(r) + "\n" for r in rows)
            self.handle = open(path, "a", buffering=1)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(_to_json(row) + "\n")

    def write_json(self, name: str, make: Callable[[], dict[str, Any]]) -> None:
        """``make`` is only called when the file is written (env.json's git and triton look-ups are slow)."""
        if self.dir is not None and self.info.is_main:
            (self.dir / name).write_text(json.dumps(make(), indent=2, sort_keys=True, default=str) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _to_json(row: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def _progress_bar(cfg: TrainConfig, info: DistInfo, start: int):
    if not (cfg.progress and info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)


def _format(row: dict[str, Any]) -> str:
    parts = [f"{row['kind']} step {row['step']}"]
    for key, value in row.items():
        if key in ("kind", "step"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def _show(bar: Any, info: DistInfo, row: dict[str, Any]) -> None:
    if bar is not None:
        if row["kind"] == "train":
            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}", refresh=False)
        else:
            bar.write(_format(row))
    else:
        log0(info, _format(row))


def _warn_config_changes(saved: dict[str, Any], cfg: TrainConfig, info: DistInfo) -> None:
    now = cfg.to_dict()
    # a longer run keeps the constant schedule's learning rates; cosine and wsd stretch with steps
    neutral = RESUME_NEUTRAL_FIELDS + (("steps",) if cfg.schedule == "constant" else ())
    changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in neutral)
    if changed and info.is_main:
        warnings.warn("resuming with a config that differs from the checkpoint's in "
                      + ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
                      + "; the continuation is not the run that was interrupted", stacklevel=3)

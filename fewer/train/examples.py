"""A tiny self-contained training problem that exercises the whole loop, in one process or many.

A residual MLP learns a fixed random teacher network on synthetic Gaussian inputs. Global batch
``step`` is drawn from a generator seeded by (data seed, step) and then split between ranks, so one
process and N processes see the same global batches: DDP and FSDP2 runs can be compared with a
single-process run, parameter for parameter.

    python -m fewer.train.examples --out runs/example                      # one process
    python -m torch.distributed.run --nproc_per_node 2 --master_port 29512 \\
        -m fewer.train.examples --distributed ddp --out runs/ddp            # or fsdp2; add --device cuda

The last line printed (rank 0) is ``final params checksum sha256=... sum=... step=...``; with an
out dir the final weights are also written to ``<out>/final_params.pt``. ``--stop-at K`` ends the run
after K updates as a preemption would (a checkpoint is written when --ckpt-every > 0); run the same
command without it to resume. Every TrainConfig field is a flag (``--lr``, ``--precision``, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import TrainConfig
from .loop import TrainState, train


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


class TinyRegressor(nn.Module):
    """in -> width, ``depth`` residual MLP blocks (the FSDP2 units), LayerNorm, -> out."""

    def __init__(self, dim_in: int = 16, width: int = 32, depth: int = 3, dim_out: int = 4):
        super().__init__()
        self.inp = nn.Linear(dim_in, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


class SyntheticRegression:
    """y = teacher(x) with x ~ N(0, I); the teacher is a fixed random two-layer tanh network."""

    def __init__(self, dim_in: int = 16, dim_out: int = 4, global_batch: int = 32, seed: int = 1234,
                 eval_size: int = 256):
        self.dim_in, self.global_batch, self.seed = dim_in, global_batch, seed
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(dim_in, 64, generator=g) / dim_in ** 0.5
        self.w2 = torch.randn(64, dim_out, generator=g) / 8.0
        x_eval = torch.randn(eval_size, dim_in, generator=torch.Generator().manual_seed(seed + 1))
        self.eval_batch = (x_eval, self.teacher(x_eval))

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1) @ self.w2

    def get_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_batch % world_size:
            raise ValueError(f"global_batch={self.global_batch} must be divisible by world_size={world_size}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(self.global_batch, self.dim_in, generator=g)
        share = self.global_batch // world_size
        x = x[rank * share:(rank + 1) * share]
        return x, self.teacher(x)

    @staticmethod
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x).float(), y)

    def eval_fn(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in self.eval_batch)
        return {"loss": F.mse_loss(model(x).float(), y).item()}


EXAMPLE_CONFIG = TrainConfig(steps=40, lr=3e-3, warmup_steps=4, schedule="cosine", weight_decay=0.01,
                             log_every=5, eval_every=20, progress=False)


def params_checksum(state: dict[str, torch.Tensor]) -> tuple[str, float]:
    """sha256 of the fp32 bytes of every tensor (sorted by name), and the sum of all entries."""
    digest = hashlib.sha256()
    total = 0.0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
        total += float(tensor.double().sum())
    return digest.hexdigest()[:16], total


class StopAt:
    """Callback that ends the run after ``step`` updates, as a preemption would."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, state: TrainState) -> None:
        if state.step >= self.step:
            state.stop = True


def build_parser() -> argparse.ArgumentParser:
    from ..cli import add_config_arguments

    changed = {k: v for k, v in EXAMPLE_CONFIG.to_dict().items() if v != getattr(TrainConfig(), k)}
    parser = argparse.ArgumentParser(prog="python -m fewer.train.examples", description=__doc__.split("\n")[0],
                                     epilog=f"This example changes these TrainConfig defaults: {changed}")
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--out", dest="out_dir", default=None, help="same as --out-dir")
    parser.add_argument("--stop-at", type=int, default=0, help="end after this many updates (simulated preemption)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the checksum line's fields (rank 0) for programmatic use."""
    from ..cli import config_from_args

    args = build_parser().parse_args(argv)
    cfg = config_from_args(TrainConfig, args, base=EXAMPLE_CONFIG)
    task = SyntheticRegression(global_batch=args.global_batch)
    torch.manual_seed(cfg.seed)  # every rank builds identical initial weights (FSDP2 does not broadcast them)
    model = TinyRegressor(width=args.width, depth=args.depth)
    callbacks = [StopAt(args.stop_at)] if args.stop_at else []
    result = train(model, task.loss_fn, task.get_batch, cfg, eval_fn=task.eval_fn, callbacks=callbacks)

    state = distributed.full_state_dict(model)  # a collective: every rank takes part
    summary: dict[str, Any] = {"step": result.step, "loss": result.final.get("loss"),
                               "eval_loss": result.final.get("eval_loss")}
    if distributed.rank() == 0:
        checksum, total = params_checksum(state)
        summary.update(sha256=checksum, sum=total)
        if result.out_dir is not None:
            torch.save(state, result.out_dir / "final_params.pt")
        print(f"final params checksum sha256={checksum} sum={total:.9e} step={result.step} "
              f"loss={summary['loss']} eval_loss={summary['eval_loss']}", flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    finally:
        distributed.cleanup()
    sys.exit(0)

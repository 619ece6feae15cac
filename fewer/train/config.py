"""``TrainConfig``: everything the one training loop needs to know, and nothing about the model.

The model, the loss and the data are the caller's (``train(model, loss_fn, get_batch, cfg)``); this
config only describes the optimizer (AdamW), the learning-rate schedule, precision, evaluation,
checkpointing, logging and the distributed mode.
"""

from __future__ import annotations

import dataclasses
import math

from ..core.config import Config, ConfigError, check_choice, check_positive_int, check_range

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("none", "ddp", "fsdp2")
DEVICES = ("auto", "cpu", "cuda")
RESUME = ("auto", "never")
ON_NONFINITE = ("raise", "skip")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    # ---- length and optimizer (AdamW; weight decay only on >= 2-D parameters) ----
    steps: int = 1000                 # optimizer updates in the whole run (not in this call: see resume)
    lr: float = 3e-4                  # peak learning rate
    min_lr_ratio: float = 0.1         # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 0             # linear warmup: update i uses lr * (i + 1) / warmup_steps
    schedule: str = "cosine"          # "cosine" | "wsd" (warmup-stable-decay) | "constant" (after warmup)
    decay_fraction: float = 0.2       # wsd only: the last decay_fraction of the steps decay linearly to min
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0            # clip the global gradient norm to this; 0 = off (the norm is still logged)
    grad_accum: int = 1               # split each batch into this many micro-batches (same update, less memory)
    # ---- numerics and device ----
    precision: str = "auto"           # "auto": bf16 autocast on CUDA, fp32 on CPU | "bf16" (any device) | "fp32"
    device: str = "auto"              # "auto": cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu
    compile: bool = False             # torch.compile the (wrapped) model in place
    # ---- cadence (0 = never; the last step always logs, and evaluates / checkpoints if enabled) ----
    eval_every: int = 0
    ckpt_every: int = 0
    log_every: int = 10
    keep_last: int = 2                # checkpoints kept on disk; 0 = keep all
    # ---- run ----
    seed: int = 0                     # each rank seeds seed + rank before training
    out_dir: str = ""                 # "" = write nothing (no metrics.jsonl, config.json, checkpoints)
    resume: str = "auto"              # "auto": continue from out_dir's latest checkpoint if any | "never"
    distributed: str = "none"         # "none" | "ddp" | "fsdp2" (the last two under torchrun)
    progress: bool = True             # tqdm bar on rank 0
    on_nonfinite: str = "raise"       # non-finite loss or gradient norm: "raise" | "skip" the update
    max_skipped: int = 10             # with on_nonfinite="skip": raise once more than this many were skipped

    def validate(self) -> None:
        check_positive_int(self, "steps")
        check_range(self, "lr", 0.0, None, low_open=True)
        check_range(self, "min_lr_ratio", 0.0, 1.0)
        check_range(self, "warmup_steps", 0, self.steps)
        check_choice(self, "schedule", SCHEDULES)
        check_range(self, "decay_fraction", 0.0, 1.0, low_open=True)
        check_range(self, "weight_decay", 0.0, None)
        check_range(self, "beta1", 0.0, 1.0, high_open=True)
        check_range(self, "beta2", 0.0, 1.0, high_open=True)
        check_range(self, "eps", 0.0, None, low_open=True)
        check_range(self, "grad_clip", 0.0, None)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "device", DEVICES)
        for name in ("eval_every", "ckpt_every", "keep_last", "max_skipped", "seed"):
            check_range(self, name, 0, None)
        check_positive_int(self, "log_every")
        check_positive_int(self, "grad_accum")
        check_choice(self, "resume", RESUME)
        check_choice(self, "distributed", DISTRIBUTED)
        check_choice(self, "on_nonfinite", ON_NONFINITE)
        if self.ckpt_every and not self.out_dir:
            raise ConfigError(f"TrainConfig.ckpt_every={self.ckpt_every} is not allowed with out_dir='': "
                              "checkpoints need a folder; set out_dir or ckpt_every=0")
        if self.schedule == "wsd" and self.warmup_steps + self.decay_steps > self.steps:
            raise ConfigError(f"TrainConfig.warmup_steps={self.warmup_steps} is not allowed with schedule='wsd': "
                              f"warmup plus the {self.decay_steps} decay steps (decay_fraction="
                              f"{self.decay_fraction} of steps={self.steps}) must fit in steps")

    @property
    def decay_steps(self) -> int:
        """wsd: number of final updates over which the learning rate decays linearly (at least 1)."""
        # the tiny slack keeps e.g. 0.1 * 30 = 3.0000000000000004 at 3 steps
        return max(1, math.ceil(self.decay_fraction * self.steps - 1e-9))


TrainConfig.register_preset("smoke", steps=20, lr=1e-2, warmup_steps=2, log_every=5, progress=False)

"""The one training loop (single process, or torchrun with DDP / FSDP2), its schedules and checkpoints.

    from fewer.train import TrainConfig, train
    result = train(model, loss_fn, get_batch, TrainConfig(steps=200, lr=1e-3, out_dir="runs/x"))

See ``loop.py`` for the contracts (loss_fn, get_batch, eval_fn), ``checkpoint.py`` for bit-exact
resume, ``distributed.py`` for torchrun, and ``examples.py`` for a runnable end-to-end example.
"""

from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from .config import TrainConfig
from .distributed import DistInfo, cleanup, full_state_dict, unwrap
from .loop import NonFiniteLossError, TrainResult, TrainState, param_groups, train
from .schedules import lr_at

__all__ = [
    "TrainConfig", "train", "TrainResult", "TrainState", "NonFiniteLossError", "param_groups", "lr_at",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_model_weights",
    "DistInfo", "cleanup", "full_state_dict", "unwrap",
]

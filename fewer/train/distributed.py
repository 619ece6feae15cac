"""Multi-process training with PyTorch's own engine: torchrun, DDP and FSDP2 (``fully_shard``).

The same ``train()`` runs single-process and under ``torchrun``; this module is the only place that
knows the difference:

- ``setup(mode, device)`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) and starts the process group: NCCL for CUDA, gloo for CPU. A group that the caller
  already started is reused (and then not destroyed by ``cleanup``).
- ``wrap_model(model, info)``: DDP, or FSDP2 with one ``fully_shard`` per block and then the root.
  Blocks are ``model.fsdp_units()`` if the model defines it, else every child of every
  ``nn.ModuleList`` (the usual ``layers`` / ``blocks`` container).
- small collectives (``all_reduce_mean``, ``any_rank``), ``barrier``, ``full_state_dict`` (the
  unsharded weights, gathered to rank 0 on CPU) and ``cleanup``.

FSDP2 keeps fp32 parameters and the loop uses autocast, as in single-process training, so the two give
the same numbers up to the order of the gradient reductions. (FSDP2's ``MixedPrecisionPolicy`` would
save communication but change the numerics; it is not used here.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn

logger = logging.getLogger("fewer.train")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300

_owns_process_group = False  # True when setup() started the group, so cleanup() may destroy it


@dataclasses.dataclass(frozen=True)
class DistInfo:
    mode: str                 # "none" | "ddp" | "fsdp2"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.mode != "none"


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK if CUDA is visible, else cpu; "cuda" without CUDA is an error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={requested!r} is not allowed: choose 'auto', 'cpu' or 'cuda'")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is visible to torch; use device='cpu' "
                         "or 'auto'")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                         "launch at most one process per GPU")
    return torch.device("cuda", local_rank)


def setup(mode: str, device: str = "auto", timeout_s: int = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Start (or join) the process group for ``mode`` and pick this rank's device."""
    global _owns_process_group
    if mode not in ("none", "ddp", "fsdp2"):
        raise ValueError(f"distributed={mode!r} is not allowed: choose 'none', 'ddp' or 'fsdp2'")
    import torch.distributed as dist

    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        running_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if max(launched_world, running_world) > 1:
            raise ValueError(f"distributed='none' but {max(launched_world, running_world)} processes were launched: "
                             "each would train its own copy; set distributed='ddp' or 'fsdp2', or launch one process")
        return DistInfo("none", 0, 1, 0, resolve_device(device))

    if not dist.is_available():
        raise ValueError(f"distributed={mode!r} needs torch.distributed, which this torch build lacks")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(mode, rank, world, local_rank, resolve_device(device, local_rank))

    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(f"distributed={mode!r} must be launched by torchrun (missing environment variables "
                         f"{missing}); e.g. python -m torch.distributed.run --nproc_per_node 2 -m fewer.train.examples "
                         f"--distributed {mode}")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    _owns_process_group = True
    info = DistInfo(mode, rank, world, local_rank, dev)
    log0(info, f"process group: {dist.get_backend()} with {world} processes ({mode}), rank 0 on {dev}")
    return info


def cleanup() -> None:
    """Destroy the process group if ``setup`` started it (a caller's own group is left alone)."""
    global _owns_process_group
    import torch.distributed as dist

    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one, innermost first (``fully_shard`` must go bottom-up)."""
    if hasattr(model, "fsdp_units"):
        units = list(model.fsdp_units())
    else:
        units = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]
    # modules() is pre-order, so an ancestor is listed before its descendants: reversing puts children first
    unique: dict[int, nn.Module] = {}
    for unit in reversed(units):
        if unit is model:
            continue  # the root is sharded last, by wrap_model
        unique.setdefault(id(unit), unit)
    return list(unique.values())


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around a model that is already on ``info.device``; the model itself for "none"."""
    if info.mode == "none":
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward reduces gradients across ranks only if ``enabled``: gradient accumulation
    turns it off for all micro-batches but the last (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)."""
    if enabled:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place and returned); unchanged single-process."""
    if _group_active():
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (so all ranks take the same branch)."""
    if not _group_active():
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if _group_active():
        import torch.distributed as dist

        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights on CPU with the plain module's keys. A collective under DDP/FSDP2: call it
    on every rank; rank 0 receives the tensors (other ranks may receive an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def log0(info: DistInfo | None, message: str) -> None:
    """Log on rank 0 only (every rank would print the same line)."""
    if info is None or info.is_main:
        logger.info(message)


def describe(info: DistInfo) -> dict[str, Any]:
    return {"distributed": info.mode, "world_size": info.world_size, "device": str(info.device),
            "backend": _backend_name()}


def _backend_name() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return "none"

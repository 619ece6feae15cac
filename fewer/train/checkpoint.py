"""Checkpoints that resume bit-exactly, single-process or sharded (DDP / FSDP2).

One format for every mode: ``torch.distributed.checkpoint`` (DCP), fed by ``get_state_dict`` /
``set_state_dict``, which see through DDP and FSDP2 and use the plain module's parameter names. Each
rank writes only its shards, and a checkpoint saved by N processes loads into M (it reshards; RNG
streams then cannot continue exactly, and a warning says so). Without a process group DCP runs
single-process.

Layout of ``<out_dir>/checkpoints/``::

    step_00000020/          one checkpoint (written as step_00000020.tmp/, renamed when complete)
        .metadata, __0_0.distcp, ...     DCP: model and optimizer state
        rng_rank0.pt, rng_rank1.pt, ...  per-rank Python / NumPy / torch CPU / CUDA RNG states
        meta.json                        step, world size, mode, config
    latest                  name of the newest complete checkpoint

What makes resume bit-exact: the model and AdamW state (moments and step counts) are restored exactly;
the learning rate is a pure function of the step (``schedules.lr_at``); batches come from
``get_batch(step, rank, world_size)``; and every RNG stream continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .distributed import DistInfo, barrier, log0

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (the ``latest`` pointer, else a scan), or None."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                      and (p / META).is_file())
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete fewer checkpoint (no {META})")
    return json.loads(meta_file.read_text())


# ---- RNG states (stored with plain types and tensors, so torch.load(weights_only=True) reads them) ----
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(cuda_states)} devices, this process sees "
                          f"{torch.cuda.device_count()}: CUDA RNG streams are not restored", stacklevel=2)


# ---- save / load ----
@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo, config: dict[str, Any] | None = None, keep_last: int = 0) -> Path:
    """Save after ``step`` updates. A collective under DDP/FSDP2: every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    barrier(info)  # every rank's shards and RNG file are on disk before the checkpoint is declared complete
    if info.is_main:
        meta = {"step": step, "world_size": info.world_size, "distributed": info.mode, "config": config or {},
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer_tmp = checkpoint_root(out_dir) / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name)
        pointer_tmp.replace(checkpoint_root(out_dir) / LATEST)
        if keep_last:
            _prune(out_dir, step, keep_last)
    barrier(info)
    log0(info, f"saved checkpoint {final}")
    return final


def _prune(out_dir: str | Path, current: int, keep_last: int) -> None:
    """Keep the checkpoint just written and the ``keep_last - 1`` newest before it. Checkpoints with a
    later step belong to an abandoned run (e.g. one restarted with resume="never") and go too."""
    older, abandoned = [], []
    for path in checkpoint_root(out_dir).glob("step_*"):
        if path.is_dir() and not path.name.endswith(".tmp"):
            step = int(path.name.split("_")[1])
            if step < current:
                older.append((step, path))
            elif step > current:
                abandoned.append(path)
    older.sort()
    for path in [p for _, p in older[:max(0, len(older) - (keep_last - 1))]] + abandoned:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> int:
    """Restore model, optimizer and this rank's RNG streams from ``path``; returns the step to continue from.
    A collective under DDP/FSDP2: every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    meta = read_meta(path)
    # get_state_dict gives the templates (sharded like the live model) that DCP loads into, in place
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{info.rank}.pt"
    if meta.get("world_size") == info.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        warnings.warn(f"checkpoint {path} was saved by {meta.get('world_size')} process(es) and is loaded by "
                      f"{info.world_size}: weights and optimizer state are resharded, but RNG streams restart from "
                      "the seed, so this resume is not bit-exact", stacklevel=2)
    log0(info, f"resumed from {path} at step {meta['step']}")
    return int(meta["step"])


def load_model_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load only the weights of a checkpoint (any world size) into ``model``, e.g. for evaluation."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    read_meta(path)  # clear error if the folder is not a checkpoint
    state = {"model": get_model_state_dict(model)}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return model

"""Seeding and determinism: one call seeds Python, NumPy and torch; per-sample generators make
sampler outputs independent of batch size."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: expected a non-negative integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def per_sample_generators(seeds: list[int] | range, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample (EDM's idea): sample i's noise depends only on seeds[i]."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn_per_sample(generators: list[torch.Generator], shape: tuple[int, ...], *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` per generator: result has shape (len(generators), *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms, no TF32, fixed cuBLAS workspace; restores the previous state."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_tf32_mm = torch.backends.cuda.matmul.allow_tf32
    prev_tf32_cudnn = torch.backends.cudnn.allow_tf32
    prev_bench = torch.backends.cudnn.benchmark
    prev_ws = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32_mm
        torch.backends.cudnn.allow_tf32 = prev_tf32_cudnn
        torch.backends.cudnn.benchmark = prev_bench
        if prev_ws is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_ws

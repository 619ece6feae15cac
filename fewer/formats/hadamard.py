"""Random Hadamard transform (RHT) along a chosen dimension, in blocks of a power of two >= 16.

y = (x * signs) @ H_b / sqrt(b) on each group of b consecutive elements along ``dim``, with H_b the
Sylvester Hadamard matrix and one random sign vector of length b shared by every group (as in
TetraJet-v2 and NVIDIA's recipe). The transform is orthonormal, so the inverse is
x = (y @ H_b / sqrt(b)) * signs, and two GEMM operands rotated with the same signs along the
reduction dimension give the same product.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(block: int, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 device=None) -> torch.Tensor:
    """A +-1 vector of length ``block`` from an explicit generator or seed."""
    if (generator is None) == (seed is None):
        raise ValueError("random_signs needs exactly one of generator= or seed=")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (block,), generator=generator, device=generator.device)
    return (bits * 2 - 1).to(torch.float32).to(device)


def _check(x: torch.Tensor, block: int, dim: int, signs: torch.Tensor) -> int:
    if block < 16 or block & (block - 1):
        raise ValueError(f"RHT block must be a power of two >= 16, got {block}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    if x.shape[dim] % block:
        raise ValueError(f"RHT along dim {dim}: size {x.shape[dim]} is not a multiple of the block {block}")
    if signs.shape != (block,):
        raise ValueError(f"signs must have shape ({block},), got {tuple(signs.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"RHT needs a floating-point tensor, got {x.dtype}")
    return dim % x.dim()


def _apply(x: torch.Tensor, signs: torch.Tensor, block: int, dim: int, inverse: bool) -> torch.Tensor:
    dim = _check(x, block, dim, signs)
    moved = x.movedim(dim, -1)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block).to(compute)
    h = hadamard_matrix(block, compute, device=x.device) / math.sqrt(block)
    s = signs.to(x.device, compute)
    out = (groups @ h) * s if inverse else (groups * s) @ h
    return out.reshape(moved.shape).movedim(-1, dim).to(x.dtype)


def random_hadamard_transform(x: torch.Tensor, signs: torch.Tensor, *, block: int = 16, dim: int = -1) -> torch.Tensor:
    return _apply(x, signs, block, dim, inverse=False)


def inverse_random_hadamard_transform(y: torch.Tensor, signs: torch.Tensor, *, block: int = 16, dim: int = -1) -> torch.Tensor:
    return _apply(y, signs, block, dim, inverse=True)

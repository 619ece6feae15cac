"""INT8 symmetric quantization: per-tensor, per-channel, per-token and per-block scales.

Codes are in [-127, 127] (-128 is never produced, so the grid is symmetric); scale = amax / 127
in FP32. Rounding is nearest-even or stochastic. (SageAttention's own kernels round half away
from zero; nearest-even is the unbiased choice and what the Triton kernels do.)
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantized import QuantizedTensor
from .reference import quantize
from .spec import SPECS

GRANULARITIES = ("tensor", "channel", "token", "block")


def quantize_int8(x: torch.Tensor, granularity: str = "token", *, block_size: int = 128, dim: int = -1,
                  rounding: str = "nearest", generator: Optional[torch.Generator] = None,
                  seed: Optional[int] = None) -> QuantizedTensor:
    """INT8 along ``dim`` (moved last, tensor viewed as [rows, cols]).

    granularity: "tensor" (one scale), "channel" (one scale per index of ``dim``), "token" (one
    per row: amax over ``dim``), "block" (one per ``block_size`` consecutive rows, amax over them
    and over ``dim``: SageAttention's per-block Q/K scales).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    spec = SPECS[f"int8_{granularity}"]
    return quantize(x, spec, dim=dim, rounding=rounding, generator=generator, seed=seed,
                    block_size=block_size if granularity == "block" else None)

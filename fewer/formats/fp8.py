"""FP8 E4M3 (max 448, no Inf) and E5M2 (max 57344, with Inf) with FP32 scales.

Scale = amax / element_max per tensor, per channel or per 1xB block. Finite elements saturate
at +-max (like the hardware's ``cvt.satfinite``). NaN stays NaN; Inf saturates to +-448 in E4M3
(no Inf there) and stays Inf in E5M2. For comparison, torch's own cast (2.13, CPU) saturates
E4M3 (Inf too) but overflows E5M2 to Inf (1e5 -> inf), so scaled paths clamp before casting.
Subnormals (down to 2^-9 for E4M3, 2^-16 for E5M2) are kept; -0 keeps its sign.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantized import QuantizedTensor
from .reference import quantize
from .rounding import round_to_element
from .spec import E4M3, E5M2, SPECS

GRANULARITIES = ("tensor", "channel", "block")
_ELEMENTS = {"e4m3": E4M3, "e5m2": E5M2}


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", *, block_size: int = 128,
                 dim: int = -1, rounding: str = "nearest", generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None) -> QuantizedTensor:
    """FP8 along ``dim``: granularity "tensor", "channel" (one scale per index of ``dim``) or "block" (1 x block_size)."""
    if fmt not in _ELEMENTS:
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    spec = SPECS[f"fp8_{fmt}_{granularity}"]
    return quantize(x, spec, dim=dim, rounding=rounding, generator=generator, seed=seed,
                    block_size=block_size if granularity == "block" else None)


def cast_fp8(x: torch.Tensor, fmt: str = "e4m3", rounding: str = "nearest", *,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Unscaled saturating cast to FP8 (returns a float8 tensor). NaN stays NaN; Inf saturates for E4M3, stays Inf for E5M2."""
    if fmt not in _ELEMENTS:
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    element = _ELEMENTS[fmt]
    noise = None
    if rounding == "stochastic":
        from .rounding import uniform_noise
        noise = uniform_noise(x.shape, generator=generator, seed=seed, device=x.device)
    return round_to_element(x.to(torch.float32), element, rounding, noise).to(element.storage)

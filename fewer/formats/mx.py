"""OCP Microscaling formats: MXFP4 (E2M1) and MXFP8 (E4M3 / E5M2), 32-element blocks, E8M0 scales.

Per the OCP MX v1.0 spec the shared scale is X = 2^(floor(log2(amax)) - emax_elem) with
emax_elem = 2 (E2M1), 8 (E4M3), 15 (E5M2); elements x / X are then rounded and clamped to the
element max ("floor" scale rounding, the default). Because floor can leave amax / X up to
2*2^emax_elem, the block max may clip (e.g. to 6 in MXFP4): SR is then biased, and
``scale_rounding="up"`` (TetraJet v1: the smallest power of two that clips nothing) fixes it.
Scales are stored as E8M0 codes (uint8, value 2^(code-127); 255 = NaN is never produced).
A block of zeros gets code 0.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantized import QuantizedTensor
from .reference import quantize
from .spec import SPECS

MX_FORMATS = ("mxfp4", "mxfp8", "mxfp8_e5m2")


def quantize_mx(x: torch.Tensor, fmt: str = "mxfp4", *, dim: int = -1, rounding: str = "nearest",
                scale_rounding: str = "floor", generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, stream: int = 0, packed: bool = True) -> QuantizedTensor:
    if fmt not in MX_FORMATS:
        raise ValueError(f"fmt must be one of {MX_FORMATS}, got {fmt!r}")
    return quantize(x, SPECS[fmt], dim=dim, rounding=rounding, scale_rounding=scale_rounding,
                    generator=generator, seed=seed, stream=stream, packed=packed)

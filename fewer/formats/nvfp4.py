"""NVFP4: E2M1 elements, an E4M3 scale per 16 elements, and an FP32 second-level scale.

* ``quantize_nvfp4(x, dim=...)``: NVIDIA's format: 1x16 blocks along ``dim`` (or 16x16 tiles with
  ``block_2d=True``, for weights: then Q(W)^T = Q(W^T) exactly), E4M3 block scales and one FP32
  scale per tensor, s2 = amax / (6 * 448).
* ``quantize_nvfp4(x, second_level="outer128")``: TetraJet-v2's double-block variant, one FP32
  scale per 1x128 block instead of per tensor.
* ``quantize_nvfp4_unbiased``: TetraJet-v2's unbiased double-block quantizer: 1x16 + 1x128 scales,
  stochastic rounding, and block scales rounded *up* to E4M3 so that no element is clipped; then
  E[dequantize(q(x))] = x through both levels of scale. (With nearest-rounded block scales, as in
  the released TetraJet-v2 code, about half the blocks clip their max and SR is biased by about -1 %
  on those elements; ``scale_rounding="headroom"`` is Quartet II's 17/16 fix.)

Codes are packed two per byte, element 2i in the low nibble (``packed=False`` keeps one code per byte).
E2M1 has no Inf/NaN: inputs must be finite (checked).
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantized import QuantizedTensor
from .reference import quantize
from .spec import SPECS


def quantize_nvfp4(x: torch.Tensor, *, dim: int = -1, block_2d: bool = False, second_level: str = "tensor",
                   rounding: str = "nearest", scale_rounding: str = "nearest",
                   generator: Optional[torch.Generator] = None, seed: Optional[int] = None, stream: int = 0,
                   packed: bool = True, tensor_amax: Optional[torch.Tensor] = None) -> QuantizedTensor:
    if second_level not in ("tensor", "outer128"):
        raise ValueError(f"second_level must be 'tensor' (NVIDIA) or 'outer128' (TetraJet-v2), got {second_level!r}")
    if block_2d and second_level != "tensor":
        raise ValueError("16x16 weight blocks (block_2d=True) go with the per-tensor second level")
    if block_2d and x.dim() != 2:
        raise ValueError(f"16x16 blocks need a 2D weight, got shape {tuple(x.shape)}")
    name = "nvfp4_2d" if block_2d else ("nvfp4" if second_level == "tensor" else "nvfp4_double")
    return quantize(x, SPECS[name], dim=dim, rounding=rounding, scale_rounding=scale_rounding,
                    generator=generator, seed=seed, stream=stream, packed=packed, tensor_amax=tensor_amax)


def quantize_nvfp4_unbiased(x: torch.Tensor, *, dim: int = -1, generator: Optional[torch.Generator] = None,
                            seed: Optional[int] = None, stream: int = 0, scale_rounding: str = "up",
                            packed: bool = True) -> QuantizedTensor:
    """TetraJet-v2's double-block NVFP4 quantizer with stochastic rounding (unbiased)."""
    return quantize(x, SPECS["nvfp4_double"], dim=dim, rounding="stochastic", scale_rounding=scale_rounding,
                    generator=generator, seed=seed, stream=stream, packed=packed)

"""QuantizedTensor: one object that carries codes, scales and format, and FP4 packing.

Layout convention (the one training GEMMs use): the quantized dimension is moved last, and the
tensor is viewed as 2D ``[rows, cols]`` (rows = product of the other dimensions). ``data`` holds
the codes in that layout (``stored_shape``), FP4 packed two per byte with the even element in the
low nibble. ``scale`` is ``[rows / block_rows, cols / block_cols]``. ``outer_scale`` is the FP32
second level of NVFP4: a 0-d tensor (per tensor) or ``[rows, cols / 128]`` (TetraJet-v2's
double-block). A column-wise operand of a matrix [M, K] (``dim=0``) is therefore stored
transposed, as [K, M].
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .spec import E2M1, FormatSpec

# E2M1 code (sign << 3 | magnitude index) -> value
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """Exactly representable E2M1 values (float32) -> 4-bit codes (uint8). The sign bit is kept for -0."""
    v = values.abs()
    index = torch.where(v < 2.0, v * 2.0, torch.where(v < 4.0, v + 2.0, v * 0.5 + 4.0))
    sign = (values.view(torch.int32) < 0).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_lut(codes.device)[codes.to(torch.int64)]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] 4-bit codes -> [..., n/2] bytes, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two FP4 codes per byte needs an even last dimension, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).view(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 code c -> 2^(c - 127); code 255 is NaN (OCP MX)."""
    value = torch.ldexp(torch.ones_like(codes, dtype=torch.float32), codes.to(torch.int32) - 127)
    return torch.where(codes == 255, torch.full_like(value, float("nan")), value)


def expand_blocks(scale: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """[nR, nC] per-block values -> [nR*block_rows, nC*block_cols]."""
    n_r, n_c = scale.shape
    return scale[:, None, :, None].expand(n_r, block_rows, n_c, block_cols).reshape(n_r * block_rows, n_c * block_cols)


@dataclasses.dataclass
class QuantizedTensor:
    """Codes + scales + format. ``dequantize()`` returns the values in the original layout."""

    data: torch.Tensor
    scale: torch.Tensor
    spec: FormatSpec
    original_shape: torch.Size
    dim: int                                  # the quantized dimension in the original tensor
    block: tuple[int, int]                    # resolved (block_rows, block_cols) over the 2D view
    outer_scale: Optional[torch.Tensor] = None
    packed: bool = False

    @property
    def stored_shape(self) -> torch.Size:
        """Logical shape of the codes: the original shape with ``dim`` moved last."""
        shape = list(self.original_shape)
        shape.append(shape.pop(self.dim))
        return torch.Size(shape)

    @property
    def element_values(self) -> torch.Tensor:
        """The element values (before scaling) as float32, in the stored 2D layout [rows, cols]."""
        cols = self.stored_shape[-1] if len(self.stored_shape) else 1
        if self.spec.element is E2M1:
            codes = unpack_fp4(self.data) if self.packed else self.data
            values = e2m1_decode(codes)
        else:
            values = self.data.to(torch.float32)
        return values.reshape(-1, cols)

    def scale_values(self) -> torch.Tensor:
        if self.spec.scale_format == "e8m0":
            return e8m0_to_float(self.scale)
        return self.scale.to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32, stored_layout: bool = False) -> torch.Tensor:
        values = self.element_values
        block_rows, block_cols = self.block
        scale = expand_blocks(self.scale_values(), block_rows, block_cols)
        if self.outer_scale is not None:
            if self.outer_scale.dim() == 0:
                scale = scale * self.outer_scale
            else:
                scale = scale * expand_blocks(self.outer_scale, 1, 128)
        out = (values * scale).reshape(self.stored_shape)
        if not stored_layout:
            out = out.movedim(-1, self.dim)
        return out.to(dtype)

    def nbytes(self) -> int:
        total = self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()
        if self.outer_scale is not None:
            total += self.outer_scale.numel() * self.outer_scale.element_size()
        return total

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.original_shape)
        block_rows, block_cols = self.block
        second = ""
        if self.outer_scale is not None:
            second = ", fp32 per tensor" if self.outer_scale.dim() == 0 else ", fp32 per 1x128"
        n = max(1, self.original_shape.numel())
        return (f"QuantizedTensor({self.spec.name}: {self.spec.element.name} elements, shape {shape}, "
                f"blocks {block_rows}x{block_cols} along dim {self.dim}, {self.spec.scale_format} scales{second}, "
                f"{'packed, ' if self.packed else ''}{self.nbytes() * 8 / n:.3g} bits/value, "
                f"device {self.data.device.type})")

"""What each number format is: its element grid, its block shape and its scale format.

An element format is a sign-magnitude grid: ``mantissa_bits`` explicit mantissa bits, a smallest
normal exponent ``min_exponent`` (below it the grid is subnormal, with the same step as the
smallest binade) and a largest finite magnitude ``max_value``. INT8 fits the same description
with a fixed step of 1 (``mantissa_bits=None``).

A :class:`FormatSpec` adds how elements share scales: the block shape (``None`` in a block entry
means "the whole extent of that dimension") and the scale's own format.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    name: str
    bits: int
    mantissa_bits: Optional[int]   # None: integer grid (step 1)
    min_exponent: int              # exponent of the smallest normal binade (unused for int)
    max_value: float               # largest finite magnitude
    has_inf: bool
    has_nan: bool
    storage: torch.dtype           # dtype of one unpacked element in memory

    @property
    def is_integer(self) -> bool:
        return self.mantissa_bits is None

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest binade (emax_elem in the OCP MX spec)."""
        if self.is_integer:
            raise ValueError(f"{self.name} is an integer format and has no exponent")
        import math
        return int(math.floor(math.log2(self.max_value)))

    @property
    def smallest_subnormal(self) -> float:
        if self.is_integer:
            return 1.0
        return 2.0 ** (self.min_exponent - self.mantissa_bits)


INT8_ELEMENT = ElementFormat("int8", 8, None, 0, 127.0, False, False, torch.int8)
E4M3 = ElementFormat("e4m3", 8, 3, -6, 448.0, False, True, torch.float8_e4m3fn)
E5M2 = ElementFormat("e5m2", 8, 2, -14, 57344.0, True, True, torch.float8_e5m2)
E2M1 = ElementFormat("e2m1", 4, 1, 0, 6.0, False, False, torch.uint8)

ELEMENTS = {e.name: e for e in (INT8_ELEMENT, E4M3, E5M2, E2M1)}

# Scale formats: "fp32" (a float32 multiplier), "e4m3" (unsigned use of float8_e4m3fn, max 448),
# "e8m0" (a power of two 2^(code-127), code 255 = NaN, stored as uint8).
SCALE_FORMATS = ("fp32", "e4m3", "e8m0")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A block-scaled number format.

    ``block_shape`` is (rows, cols) over the tensor viewed as [rows, cols] with the quantized
    dimension last; ``None`` spans the whole extent. ``second_level`` names an extra FP32 scale
    above the block scales: ``"tensor"`` (one per tensor, NVFP4 as NVIDIA defines it) or
    ``"outer128"`` (one per 1x128 block, TetraJet-v2's double-block variant) or ``None``.
    """

    name: str
    element: ElementFormat
    block_shape: tuple[Optional[int], Optional[int]]
    scale_format: str
    second_level: Optional[str] = None
    where_used: str = ""

    def __post_init__(self) -> None:
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {self.scale_format!r}")
        if self.second_level not in (None, "tensor", "outer128"):
            raise ValueError(f"second_level must be None, 'tensor' or 'outer128', got {self.second_level!r}")

    @property
    def element_max(self) -> float:
        return self.element.max_value

    @property
    def element_bits(self) -> int:
        return self.element.bits

    def describe(self) -> dict:
        rows, cols = self.block_shape
        if rows is None and cols is None:
            block = "per tensor"
        elif rows is None and cols == 1:
            block = "per channel"
        elif rows == 1 and cols is None:
            block = "per token (row)"
        elif cols is None:
            block = f"{rows} tokens (rows)"
        else:
            block = f"{rows}x{cols}"
        scale = self.scale_format.upper() + (" x FP32 per tensor" if self.second_level == "tensor" else
                                             " x FP32 per 1x128" if self.second_level == "outer128" else "")
        return {"format": self.name, "element": self.element.name.upper(), "bits": self.element.bits,
                "block": block, "scale": scale, "max": self.element.max_value, "used by": self.where_used}


def _spec(name, element, block, scale, second=None, used=""):
    return FormatSpec(name=name, element=element, block_shape=block, scale_format=scale,
                      second_level=second, where_used=used)


# The named formats of fewer. Block sizes of the per-block variants are the defaults; the
# quantize functions take the block size as a parameter.
SPECS: dict[str, FormatSpec] = {s.name: s for s in (
    _spec("int8_tensor", INT8_ELEMENT, (None, None), "fp32"),
    _spec("int8_channel", INT8_ELEMENT, (None, 1), "fp32", used="weights (zero-shot quantization)"),
    _spec("int8_token", INT8_ELEMENT, (1, None), "fp32", used="SageAttention P~ (SageBwd)"),
    _spec("int8_block", INT8_ELEMENT, (128, None), "fp32", used="SageAttention Q/K (per block of tokens)"),
    _spec("int8_block1d", INT8_ELEMENT, (1, 128), "fp32", used="INT8 GEMM operands (1xB blocks, fused kernel)"),
    _spec("fp8_e4m3_tensor", E4M3, (None, None), "fp32"),
    _spec("fp8_e4m3_channel", E4M3, (None, 1), "fp32", used="SageAttention V (per channel)"),
    _spec("fp8_e4m3_block", E4M3, (1, 128), "fp32", used="FP8 training operands (1x128)"),
    _spec("fp8_e5m2_tensor", E5M2, (None, None), "fp32", used="FP8 gradients"),
    _spec("fp8_e5m2_channel", E5M2, (None, 1), "fp32"),
    _spec("fp8_e5m2_block", E5M2, (1, 128), "fp32"),
    _spec("nvfp4", E2M1, (1, 16), "e4m3", "tensor", used="NVFP4 training (NVIDIA recipe), FP4 attention"),
    _spec("nvfp4_2d", E2M1, (16, 16), "e4m3", "tensor", used="NVFP4 weights (NVIDIA recipe, 16x16)"),
    _spec("nvfp4_double", E2M1, (1, 16), "e4m3", "outer128", used="TetraJet-v2 training (all six operands)"),
    _spec("mxfp4", E2M1, (1, 32), "e8m0", used="MXFP4 baselines (Quartet, TetraJet v1)"),
    _spec("mxfp8", E4M3, (1, 32), "e8m0", used="OutControl outlier channels (TetraJet-v2)"),
    _spec("mxfp8_e5m2", E5M2, (1, 32), "e8m0"),
)}


def get_spec(name: str) -> FormatSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(SPECS)}") from None

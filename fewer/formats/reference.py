"""The PyTorch reference quantizer for every block-scaled format (and the Triton kernels' twin).

One engine serves INT8, FP8, NVFP4 and MX: move the quantized dimension last, view as
[rows, cols], take the absolute max of each block, turn it into a scale, divide (or, for
power-of-two scales, multiply), round each element onto its grid and encode. The scale formulas
below are the ones the kernels repeat operation for operation:

* FP32 scale (INT8, FP8):  s = amax / element_max (1 where amax == 0);  a = x * (1/s).
* NVFP4 (E4M3 block scale, FP32 second level s2, NVIDIA / TetraJet-v2):
  s2 = amax_2 / (6 * 448) (1 where amax_2 == 0), with amax_2 over the tensor or over a 1x128 block;
  r = amax_block * (1 / (6 * s2));  s_b = E4M3(min(r, 448)) rounded by ``scale_rounding``
  ("nearest": ties-to-even as in NVIDIA/TE and TetraJet-v2; "up": ceiling, so nothing clips and
  SR is unbiased; "headroom": nearest of r*17/16 as in Quartet II); a zero s_b becomes 2^-9;
  a = x * (1 / (s_b * s2)).
* MX (E8M0 block scale, OCP MX v1.0): e = floor(log2 amax) - emax_elem ("floor", the spec) or the
  smallest e with amax / 2^e <= element_max ("up", TetraJet v1), clamped to [-127, 126];
  a = x * 2^-e. A zero block gets e = -127.
Elements are clamped to +-element_max (saturation) before rounding. Every division is IEEE fp32
and happens once per block; elements are multiplied by the block's reciprocal (as Transformer
Engine does), which is what makes the kernels fast and still bit-identical to this reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantized import QuantizedTensor, e2m1_encode, expand_blocks, pack_fp4
from .rounding import exp2_int, floor_log2, round_magnitude, round_to_element, uniform_noise
from .spec import E2M1, E4M3, FormatSpec, get_spec

NVFP4_TENSOR_DIVISOR = 6.0 * 448.0
OUTER_BLOCK = 128
E4M3_MIN_SCALE = 2.0 ** -9
SCALE_ROUNDING = {"e4m3": ("nearest", "up", "headroom"), "e8m0": ("floor", "up"), "fp32": ("exact",)}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_input(x: torch.Tensor, dim: int, check_finite: bool = True) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"quantizers take float32, float16 or bfloat16 input, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantizers need a tensor with at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf; scaled quantizers need finite input "
                         "(use round_to_element for a plain cast with the format's special values)")
    return dim % x.dim()


def resolve_block(spec: FormatSpec, rows: int, cols: int, block_size: Optional[int]) -> tuple[int, int]:
    block_rows, block_cols = spec.block_shape
    if block_size is not None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if spec.scale_format != "fp32":
            raise ValueError(f"{spec.name} fixes its block shape {spec.block_shape}; block_size= is not allowed")
        if block_rows not in (None, 1) and block_cols not in (None, 1):
            block_rows = block_cols = block_size          # square 2D tiles
        elif block_cols not in (None, 1):
            block_cols = block_size
        elif block_rows not in (None, 1):
            block_rows = block_size
        else:
            raise ValueError(f"{spec.name} has no block size to set (block shape {spec.block_shape})")
    block_rows = rows if block_rows is None else block_rows
    block_cols = cols if block_cols is None else block_cols
    if rows % block_rows or cols % block_cols:
        raise ValueError(
            f"{spec.name}: the tensor viewed as [{rows}, {cols}] (quantized dim last) is not a multiple of "
            f"the block {block_rows}x{block_cols}; pad it first (fewer.formats.pad_to_multiple)")
    if spec.second_level == "outer128" and (cols % OUTER_BLOCK or block_rows != 1):
        raise ValueError(f"{spec.name}: the 1x128 outer blocks need the quantized dim to be a multiple of 128 "
                         f"and 1xN inner blocks, got [{rows}, {cols}] with block {block_rows}x{block_cols}")
    return block_rows, block_cols


def block_amax(x2d: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    rows, cols = x2d.shape
    return x2d.abs().view(rows // block_rows, block_rows, cols // block_cols, block_cols).amax(dim=(1, 3))


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = -1) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple (zeros do not change any block's amax)."""
    size = x.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


# ---------------------------------------------------------------------------------------------
# scale formulas (shared, operation for operation, with the kernels)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    # tensor / tensor is IEEE division on CPU and CUDA; torch turns "tensor / python scalar" on CUDA
    # into a multiply by the reciprocal, which the kernels would not reproduce bit for bit.
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d per block, IEEE-rounded; elements are then multiplied by it (one division per block, not per element)."""
    return _div(torch.ones_like(d), d)


def fp32_scale(amax: torch.Tensor, element_max: float) -> torch.Tensor:
    scale = _div(amax, element_max)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def nvfp4_second_level(amax: torch.Tensor) -> torch.Tensor:
    s2 = _div(amax, NVFP4_TENSOR_DIVISOR)
    return torch.where(amax == 0, torch.ones_like(s2), s2)


def nvfp4_block_scale(amax_block: torch.Tensor, s2: torch.Tensor, scale_rounding: str) -> torch.Tensor:
    """E4M3 block scales (float32 values that are exactly representable in E4M3).

    ratio = amax_block * (1 / (6 * s2)): one division per second-level scale, not per block.
    """
    ratio = amax_block * reciprocal(s2 * 6.0)
    if scale_rounding == "headroom":
        ratio = ratio * 1.0625
    ratio = torch.clamp(ratio, max=448.0)
    scale = round_magnitude(ratio, E4M3, "up" if scale_rounding == "up" else "nearest")
    return torch.where(scale == 0, torch.full_like(scale, E4M3_MIN_SCALE), scale)


def e8m0_exponent(amax: torch.Tensor, element_max: float, element_emax: int, scale_rounding: str) -> torch.Tensor:
    e = torch.clamp(floor_log2(amax) - element_emax, -127, 126)
    if scale_rounding == "up":
        e = torch.clamp(torch.where(amax * exp2_int(-e) > element_max, e + 1, e), max=126)
    return torch.where(amax == 0, torch.full_like(e, -127), e)


# ---------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, spec: FormatSpec | str, *, dim: int = -1, block_size: Optional[int] = None,
             rounding: str = "nearest", scale_rounding: Optional[str] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None, stream: int = 0,
             packed: bool = True, tensor_amax: Optional[torch.Tensor] = None,
             check_finite: bool = True) -> QuantizedTensor:
    """Quantize ``x`` along ``dim`` into ``spec`` (the PyTorch reference path).

    rounding: "nearest" (ties to even) or "stochastic" (needs ``generator`` or ``seed``; with a seed
    the numbers are the kernels' counter-based stream ``stream``, indexed by the source element).
    scale_rounding: E4M3 scales "nearest" (default) | "up" | "headroom"; E8M0 scales "floor"
    (default, OCP) | "up". tensor_amax: the NVFP4 per-tensor amax if already known (delayed scaling).
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    dim = check_input(x, dim, check_finite)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "nearest" and (generator is not None or seed is not None):
        raise ValueError("generator/seed are only used by rounding='stochastic'")
    allowed = SCALE_ROUNDING[spec.scale_format]
    scale_rounding = allowed[0] if scale_rounding is None else scale_rounding
    if scale_rounding not in allowed:
        raise ValueError(f"{spec.name} ({spec.scale_format} scales) takes scale_rounding in {allowed}, got {scale_rounding!r}")

    moved = x.movedim(dim, -1)
    cols = moved.shape[-1]
    x2d = moved.reshape(-1, cols).to(torch.float32)
    rows = x2d.shape[0]
    block_rows, block_cols = resolve_block(spec, rows, cols, block_size)
    element = spec.element
    amax = block_amax(x2d, block_rows, block_cols)
    outer = None

    if spec.scale_format == "fp32":
        scale = fp32_scale(amax, element.max_value)
        scaled = x2d * expand_blocks(reciprocal(scale), block_rows, block_cols)
        stored_scale = scale
    elif spec.scale_format == "e4m3":
        if spec.second_level == "tensor":
            t_amax = x2d.abs().amax() if tensor_amax is None else tensor_amax.to(torch.float32).reshape(())
            outer = nvfp4_second_level(t_amax)
            s2_blocks = outer
        else:
            outer = nvfp4_second_level(block_amax(x2d, 1, OUTER_BLOCK))
            s2_blocks = outer.repeat_interleave(OUTER_BLOCK // block_cols, dim=1)
        block_scale = nvfp4_block_scale(amax, s2_blocks, scale_rounding)
        scaled = x2d * expand_blocks(reciprocal(block_scale * s2_blocks), block_rows, block_cols)
        stored_scale = block_scale.to(torch.float8_e4m3fn)
    else:  # e8m0
        exponent = e8m0_exponent(amax, element.max_value, element.max_exponent, scale_rounding)
        scaled = x2d * expand_blocks(exp2_int(-exponent), block_rows, block_cols)
        stored_scale = (exponent + 127).to(torch.uint8)

    noise = None
    if rounding == "stochastic":
        index = torch.arange(x.numel(), device=x.device).view(x.shape).movedim(dim, -1).reshape(rows, cols)
        noise = uniform_noise(x2d.shape, generator=generator, seed=seed, stream=stream, index=index, device=x.device)
    values = round_to_element(scaled, element, rounding, noise)

    if element is E2M1:
        data = e2m1_encode(values)
        if packed:
            data = pack_fp4(data)
    else:
        data = values.to(element.storage)
        packed = False
    return QuantizedTensor(data=data, scale=stored_scale, spec=spec, original_shape=x.shape, dim=dim,
                           block=(block_rows, block_cols), outer_scale=outer, packed=packed and element is E2M1)


def fake_quantize(x: torch.Tensor, spec: FormatSpec | str, **kwargs) -> torch.Tensor:
    """quantize then dequantize, returned in x's dtype and layout."""
    return quantize(x, spec, **kwargs).dequantize(x.dtype)

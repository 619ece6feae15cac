"""Rounding onto an element grid: nearest-even, stochastic, and upward; and the random numbers SR uses.

Everything here is exact float32 arithmetic built from bit fields, written so that the Triton
kernels in :mod:`fewer.formats.triton_kernels` can repeat it operation for operation: the
binade of a magnitude comes from its exponent bits, the grid step is a power of two built from
bits, and dividing by it is exact. Nearest-even uses ``torch.round`` (the kernels use the
1.5*2^23 trick, which is the same function on |y| < 2^22).

Stochastic rounding (SR) of a magnitude ``a`` between grid neighbours lo < a < hi returns hi
with probability (a - lo)/(hi - lo), so E[SR(a)] = a as long as ``a`` is not clipped. Uniform
numbers come from either an explicit ``torch.Generator`` (``torch.rand``) or a seed; a seed
drives a counter-based hash of (seed, element index), the same stream the kernels draw, so SR in
the kernels equals its PyTorch twin bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from .spec import ElementFormat

ROUNDING_MODES = ("nearest", "stochastic")
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# bit helpers (float32 only)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a finite float32 a >= 0, read off the exponent bits (-127 for 0 and subnormals)."""
    bits = a.view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for integer e in [-126, 127], built from bits (exact)."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def copy_sign_bits(magnitude: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """|magnitude| with the sign bit of ``signed`` (keeps -0.0, unlike multiplying by sign())."""
    sign = signed.view(torch.int32) & torch.tensor(-(2 ** 31), dtype=torch.int32)
    return (magnitude.view(torch.int32) | sign).view(torch.float32)


# --------------------------------------------------------------------------------------------
# counter-based random numbers (the kernels' stream)


def _mul32(x: torch.Tensor, const: int) -> torch.Tensor:
    # (x * const) mod 2^32 in int64 without overflow: split the constant into 16-bit halves.
    lo = x * (const & 0xFFFF)
    hi = ((x * (const >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, "lowbias32"); x holds values in [0, 2^32) as int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _hash32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, stream: int = 0) -> int:
    """The 31-bit key of random stream ``stream`` for ``seed`` (31 bits: it travels as an int32 kernel argument)."""
    return _hash32_int(_hash32_int(int(seed)) ^ _hash32_int(0x9E3779B9 + int(stream))) & 0x7FFFFFFF


def counter_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 numbers in [0, 1) with 24 random bits, one per element index (mod 2^32)."""
    idx = index.to(torch.int64) & _MASK32
    h = hash32(idx ^ key)      # one mixing round per element: SR's cost in the kernels is integer ALU work
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def uniform_noise(shape, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                  stream: int = 0, index: Optional[torch.Tensor] = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) noise for SR. Exactly one of ``generator`` / ``seed`` must be given.

    With ``seed``, element i of the result uses counter ``index[i]`` (default: its flat position),
    which lets a transposed operand draw the numbers of its source elements.
    """
    if (generator is None) == (seed is None):
        raise ValueError("stochastic rounding needs exactly one of generator= (a torch.Generator) "
                         "or seed= (an int); got " + ("both" if generator is not None else "neither"))
    if generator is not None:
        gen_device = generator.device
        noise = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
        return noise.to(device)
    if index is None:
        index = torch.arange(int(torch.Size(shape).numel()), device=device).view(shape)
    return counter_uniform(stream_key(seed, stream), index.to(device))


# --------------------------------------------------------------------------------------------
# rounding a magnitude onto an element grid


def grid_step(a: torch.Tensor, element: ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, 1/step) of the grid around magnitudes ``a`` (float32, 0 <= a <= max)."""
    if element.is_integer:
        one = torch.ones_like(a)
        return one, one
    e = torch.clamp(floor_log2(a), min=element.min_exponent)
    return exp2_int(e - element.mantissa_bits), exp2_int(element.mantissa_bits - e)


def round_magnitude(a: torch.Tensor, element: ElementFormat, mode: str,
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round magnitudes ``a`` (float32, >= 0, already clamped to the element max) onto the grid.

    ``mode``: "nearest" (ties to even), "stochastic" (needs ``noise`` in [0, 1)), "up" (ceiling).
    """
    step, inv_step = grid_step(a, element)
    y = a * inv_step                      # exact: a power-of-two rescale
    if mode == "nearest":
        q = torch.round(y)                # half to even
    elif mode == "stochastic":
        if noise is None:
            raise ValueError("stochastic rounding needs a noise tensor")
        low = torch.floor(y)
        q = low + (noise < (y - low)).to(torch.float32)
    elif mode == "up":
        q = torch.ceil(y)
    else:
        raise ValueError(f"rounding mode must be 'nearest', 'stochastic' or 'up', got {mode!r}")
    return q * step


def round_to_element(x: torch.Tensor, element: ElementFormat, mode: str = "nearest",
                     noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round float32 values to the element grid, saturating at +-max, keeping the sign (and -0.0).

    Special values: NaN stays NaN for every float element format (E2M1 has no NaN: NaN is
    rejected by the callers); +-Inf becomes +-Inf for E5M2 (which has Inf) and saturates to
    +-max for E4M3, E2M1 and INT8. INT8 has no -0 (it becomes 0 once cast to int8).
    """
    x = x.to(torch.float32)
    a = torch.clamp(x.abs(), max=element.max_value)
    q = copy_sign_bits(round_magnitude(a, element, mode, noise), x)
    if element.has_inf:
        q = torch.where(torch.isinf(x), x, q)
    if element.has_nan:
        q = torch.where(torch.isnan(x), x, q)
    return q


def representable_values(element: ElementFormat) -> torch.Tensor:
    """Every finite value of the element format (both signs, one zero), sorted; float32."""
    if element.is_integer:
        mags = torch.arange(0, int(element.max_value) + 1, dtype=torch.float32)
    elif element.storage in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = torch.arange(0, 128, dtype=torch.uint8).view(element.storage).to(torch.float32)
        mags = codes[torch.isfinite(codes)]
    else:  # E2M1
        mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([-mags.flip(0)[:-1], mags])

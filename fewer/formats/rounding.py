"""Rounding onto an element grid: nearest-even, stochastic, and upward; and the random numbers SR uses.

Everything here is exact float32 arithmetic built from bit fields, written so that the Triton
kernels in :mod:`fewer.formats.triton_kernels` can repeat it operation for operation: the
binade of a magnitude comes from its exponent bits, the grid step is a power of two built from
bits, and dividing by it is exact. Nearest-even uses ``torch.round`` (the kernels use the
1.5*2^23 trick, which is the same function on |y| < 2^22).

Stochastic rounding (SR) works like the hardware's ``cvt.rs``: it takes ``SR_BITS`` = 8 random
bits r per element and rounds a magnitude ``a`` between grid neighbours lo < a < hi up iff
(r + 1/2) / 256 < (a - lo)/(hi - lo), i.e. with probability round(256 f)/256 for f = (a - lo)/(hi - lo)
(halves rounded down), so |E[SR(a)] - a| <= 2^-9 (hi - lo): unbiased up to 2^-(SR_BITS+1) of a grid step,
0 on average over f, as long as ``a`` is not clipped. Below the smallest normal (and for INT8, whose grid
is uniform), the magnitude is first taken through one float32 addition, fl(a + 2^emin) (fl(a + 128) for
INT8), whose fraction bits then decide; that pre-rounding moves ``a`` by at most 2^-(24 - mantissa bits)
of a grid step (2^-17 for INT8), far below the 2^-9 above. Random bits come from either an explicit
``torch.Generator`` (``torch.rand``, the top 8 bits of each uniform) or a seed; a seed drives a
counter-based hash in which one 32-bit word serves ``SR_GROUP`` = 4 consecutive elements along the
quantized dimension (byte j for the j-th element of the group), the same stream the kernels draw,
so SR in the kernels equals its PyTorch twin bit for bit.
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


SR_BITS = 8          # random bits per element (cvt.rs-style: one 32-bit word per SR_GROUP converted values)
SR_GROUP = 4         # consecutive elements along the quantized dimension that share one hash


def counter_bits(key: int, counter: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """SR_BITS random bits per element: byte ``position`` (0..3) of hash32(counter XOR key), as int64 in [0, 256)."""
    h = hash32((counter.to(torch.int64) & _MASK32) ^ key)
    return (h >> (SR_BITS * position.to(torch.int64))) & ((1 << SR_BITS) - 1)


def counter_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """The seed stream along the last dimension of ``index`` (source element indices), as uniforms (r + 1/2)/256.

    Element c of a row takes byte c % 4 of the hash of the source index of element c - c % 4 (the first
    element of its group of SR_GROUP along the last dimension), so every group has its own counter.
    """
    index = index.to(torch.int64)
    cols = torch.arange(index.shape[-1], device=index.device) if index.dim() else torch.zeros((), dtype=torch.int64)
    pos = cols % SR_GROUP
    first = torch.gather(index, -1, (cols - pos).expand_as(index)) if index.dim() else index
    r = counter_bits(key, first, pos.expand_as(index) if index.dim() else pos)
    return (r.to(torch.float32) + 0.5) * (1.0 / (1 << SR_BITS))


def uniform_noise(shape, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                  stream: int = 0, index: Optional[torch.Tensor] = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) noise for SR. Exactly one of ``generator`` / ``seed`` must be given.

    With ``seed``, the numbers are the counter stream along the last dimension of ``index`` (default: the flat
    positions), which lets a transposed operand draw the numbers of its own source elements. SR uses
    the top SR_BITS bits of each number (``round_magnitude``).
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


def _stochastic_bits(a: torch.Tensor, element: ElementFormat, noise: torch.Tensor) -> torch.Tensor:
    """SR of magnitudes ``a`` with the top SR_BITS bits r of ``noise``, on the float32 bits (the kernels' rule).

    SHIFT = 23 - mantissa bits fraction bits are dropped; adding 2^SHIFT - 1 - 2^(SHIFT-9) - r * 2^(SHIFT-8)
    before dropping them carries into the kept bits iff (2r + 1) * 2^(SHIFT-9) < dropped bits, i.e. iff
    (r + 1/2)/256 < the fraction of a grid step. Below the smallest normal (INT8: everywhere) the bits are
    those of fl(a + lim), lim = 2^emin (INT8: 128, read as a format with 7 mantissa bits), then lim is taken
    off again (exact).
    """
    mant = 7 if element.is_integer else element.mantissa_bits
    lim = 128.0 if element.is_integer else 2.0 ** element.min_exponent
    shift = 23 - mant
    r = torch.floor(noise.to(torch.float32) * (1 << SR_BITS)).to(torch.int32).clamp(0, (1 << SR_BITS) - 1)
    small = a < lim
    bits = torch.where(small, a + lim, a).view(torch.int32)
    add = ((1 << shift) - 1 - (1 << (shift - 9))) - (r << (shift - SR_BITS))
    rounded = (((bits + add) >> shift) << shift).view(torch.float32)
    return torch.where(small, rounded - lim, rounded)


def round_magnitude(a: torch.Tensor, element: ElementFormat, mode: str,
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round magnitudes ``a`` (float32, >= 0, already clamped to the element max) onto the grid.

    ``mode``: "nearest" (ties to even), "stochastic" (needs ``noise`` in [0, 1), of which SR_BITS bits
    are used; see the module docstring for the exact rule and its 2^-9-of-a-step bound), "up" (ceiling).
    """
    if mode == "stochastic":
        if noise is None:
            raise ValueError("stochastic rounding needs a noise tensor")
        return _stochastic_bits(a, element, noise)
    step, inv_step = grid_step(a, element)
    y = a * inv_step                      # exact: a power-of-two rescale
    if mode == "nearest":
        q = torch.round(y)                # half to even
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

"""The Triton kernels of fewer.formats (imported lazily by triton_kernels.py; needs triton).

Each device function mirrors a function of fewer/formats/rounding.py or reference.py, operation
for operation; fp32 divisions use div_rn (IEEE), as torch does, not Triton's approximate '/'.
"""

import triton
import triton.language as tl



@triton.jit
def floor_log2(a):
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def exp2i(e):
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def hash32(x):
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def uniform_bits(key, index):
    h = hash32(index ^ key.to(tl.uint32))
    return (h >> 8).to(tl.int32)          # 24 random bits; u = k * 2^-24


@triton.jit
def round_magnitude(a, u, MANT: tl.constexpr, EMIN: tl.constexpr, INTEGER: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: nearest-even, 1: stochastic (u in [0, 1)), 2: up
    if INTEGER:
        step = tl.full(a.shape, 1.0, tl.float32)
        y = a
    else:
        e = tl.maximum(floor_log2(a), EMIN)
        step = exp2i(e - MANT)
        y = a * exp2i(MANT - e)
    if MODE == 0:
        q = (y + 12582912.0) - 12582912.0       # 1.5 * 2^23: rounds |y| < 2^22 half to even
    elif MODE == 1:
        low = tl.floor(y)
        q = low + (u < (y - low)).to(tl.float32)
    else:
        q = tl.ceil(y)
    return q * step


@triton.jit
def fp8_bits(v, negative, MANT: tl.constexpr, BIAS: tl.constexpr):
    # v: exactly representable non-negative FP8 magnitude -> uint8 code with sign
    vb = v.to(tl.int32, bitcast=True)
    normal = (((vb >> 23) & 0xFF) - 127 + BIAS) << MANT | ((vb & 0x7FFFFF) >> (23 - MANT))
    min_normal = exp2i(tl.full(v.shape, 1 - BIAS, tl.int32))
    # subnormal code = v / smallest subnormal (clamped so the unused lane never overflows int32)
    sub = (tl.minimum(v, min_normal) * exp2i(tl.full(v.shape, BIAS - 1 + MANT, tl.int32))).to(tl.int32)
    code = tl.where(v < min_normal, sub, normal)
    return (code | (negative.to(tl.int32) << 7)).to(tl.uint8)


@triton.jit
def quantize_code(a, k, negative, MANT: tl.constexpr, BIAS: tl.constexpr, INTEGER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, SIGN_SHIFT: tl.constexpr):
    """Magnitudes a (<= element max) -> signed element codes, rounding on the fp32 bits.

    Same function as reference.round_magnitude + encoding, computed with fewer instructions: in
    the normal range, adding (2^SHIFT - 1 + lsb) [nearest-even] or (2^SHIFT - 1 - k') [stochastic,
    k' = the top SHIFT bits of the 24-bit random k] to the fp32 bits and dropping SHIFT = 23 - MANT
    bits rounds the mantissa, a carry moving into the exponent; what is left is the element code
    plus (127 - BIAS) << MANT. Below the smallest normal (and for INT8) the grid is uniform:
    y = a / smallest step is rounded with the 1.5*2^23 trick, whose low bits then hold the integer.
    SR here goes up iff (k >> (24 - SHIFT)) < dropped bits, i.e. iff k * 2^-24 < frac(y): the
    reference's rule, so SR agrees bit for bit.
    """
    if INTEGER:
        y = a
    else:
        y = a * (2.0 ** (BIAS - 1 + MANT))
    if STOCHASTIC:
        low = tl.floor(y)
        y = low + ((k.to(tl.float32) * (1.0 / 16777216.0)) < (y - low)).to(tl.float32)
    small = (y + 12582912.0).to(tl.int32, bitcast=True) & 0xFF
    if INTEGER:
        code = tl.where(negative, -small, small)
    else:
        SHIFT: tl.constexpr = 23 - MANT
        bits = a.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            rounded = bits + (((1 << SHIFT) - 1) - (k >> (24 - SHIFT)))
        else:
            rounded = bits + (((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1))
        normal = (rounded >> SHIFT) - ((127 - BIAS) << MANT)
        code = tl.where(a < 2.0 ** (1 - BIAS), small, normal) | (negative.to(tl.int32) << SIGN_SHIFT)
    return code


@triton.jit
def nvfp4_block_scale(amax, encode_factor, SCALE_ROUND: tl.constexpr):
    ratio = amax * encode_factor
    if SCALE_ROUND == 2:
        ratio = ratio * 1.0625
    ratio = tl.minimum(ratio, 448.0)
    if SCALE_ROUND == 1:
        sb = round_magnitude(ratio, ratio, 3, -6, False, 2)
    else:
        sb = round_magnitude(ratio, ratio, 3, -6, False, 0)
    return tl.where(sb == 0.0, 0.001953125, sb)


@triton.jit
def e8m0_exponent(amax, EMAX: tl.constexpr, EMAXEXP: tl.constexpr, SCALE_ROUND: tl.constexpr):
    e = tl.minimum(tl.maximum(floor_log2(amax) - EMAXEXP, -127), 126)
    if SCALE_ROUND == 1:
        e = tl.minimum(tl.where(amax * exp2i(-e) > EMAX, e + 1, e), 126)
    return tl.where(amax == 0.0, -127, e)


@triton.jit
def amax_partial_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.max(tl.abs(x), axis=0))


@triton.jit
def block_factors(amax, encode_factor, s2, EMAX: tl.constexpr, EMAXEXP: tl.constexpr, SCALE: tl.constexpr,
                  SCALE_ROUND: tl.constexpr):
    """Per block: (multiplier applied to |x|, scale value to store). Mirrors reference.quantize."""
    if SCALE == 0:
        s = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, EMAX))
        return tl.math.div_rn(1.0, s), s
    elif SCALE == 3:
        e = e8m0_exponent(amax, EMAX, EMAXEXP, SCALE_ROUND)
        return exp2i(-e), e.to(tl.float32)
    else:
        sb = nvfp4_block_scale(amax, encode_factor, SCALE_ROUND)
        return tl.math.div_rn(1.0, sb * s2), sb


@triton.jit
def store_scales(ptr, values, mask, SCALE: tl.constexpr):
    if SCALE == 0:
        tl.store(ptr, values, mask=mask)
    elif SCALE == 3:
        tl.store(ptr, (values.to(tl.int32) + 127).to(tl.uint8), mask=mask)
    else:
        tl.store(ptr, fp8_bits(values, values < 0.0, 3, 7), mask=mask)


@triton.jit
def dual_quantize_kernel(
    x_ptr, M, K, stride_xm, stride_xk,
    row_data_ptr, row_scale_ptr, row_outer_ptr,
    col_data_ptr, col_scale_ptr, col_outer_ptr,
    amax_ptr, key_row, key_col,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr,
    MANT: tl.constexpr, BIAS: tl.constexpr, INTEGER: tl.constexpr, PACK: tl.constexpr,
    SIGN_SHIFT: tl.constexpr, EMAX: tl.constexpr, EMAXEXP: tl.constexpr,
    SCALE: tl.constexpr, SCALE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, DO_ROW: tl.constexpr, DO_COL: tl.constexpr,
):
    # SCALE 0: fp32 amax/max; 1: NVFP4 with per-tensor s2; 2: NVFP4 with 1x128 s2; 3: E8M0
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    in_m = offs_m < M
    in_k = offs_k < K
    mask = in_m[:, None] & in_k[None, :]
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    negative = x.to(tl.int32, bitcast=True) < 0
    if STOCHASTIC:
        index = (offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]).to(tl.uint32)
    s2 = 1.0
    encode_factor = 1.0
    if SCALE == 1:
        t_amax = tl.load(amax_ptr)
        s2 = tl.where(t_amax == 0.0, 1.0, tl.math.div_rn(t_amax, 2688.0))
        encode_factor = tl.math.div_rn(1.0, s2 * 6.0)

    if DO_ROW:
        NB: tl.constexpr = BK // BLOCK
        ar = tl.reshape(ax, (BM, NB, BLOCK))
        amax = tl.max(ar, axis=2)
        if SCALE == 2:
            o_amax = tl.max(amax, axis=1)
            s2o = tl.where(o_amax == 0.0, 1.0, tl.math.div_rn(o_amax, 2688.0))
            factor, stored = block_factors(amax, tl.math.div_rn(1.0, s2o * 6.0)[:, None], s2o[:, None],
                                           EMAX, EMAXEXP, SCALE, SCALE_ROUND)
        else:
            factor, stored = block_factors(amax, encode_factor, s2, EMAX, EMAXEXP, SCALE, SCALE_ROUND)
        a = tl.minimum(ar * factor[:, :, None], EMAX)
        k = a.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            k = uniform_bits(key_row, tl.reshape(index, (BM, NB, BLOCK)))
        codes = quantize_code(a, k, tl.reshape(negative, (BM, NB, BLOCK)), MANT, BIAS, INTEGER, STOCHASTIC,
                              SIGN_SHIFT)
        codes = tl.reshape(codes, (BM, BK))
        if PACK:
            lo, hi = tl.split(tl.reshape(codes, (BM, BK // 2, 2)))
            offs_b = pid_k * (BK // 2) + tl.arange(0, BK // 2)
            tl.store(row_data_ptr + offs_m.to(tl.int64)[:, None] * (K // 2) + offs_b[None, :],
                     (lo | (hi << 4)).to(tl.uint8), mask=in_m[:, None] & (offs_b < K // 2)[None, :])
        else:
            tl.store(row_data_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
                     codes.to(row_data_ptr.dtype.element_ty), mask=mask)
        offs_s = pid_k * NB + tl.arange(0, NB)
        store_scales(row_scale_ptr + offs_m.to(tl.int64)[:, None] * (K // BLOCK) + offs_s[None, :], stored,
                     in_m[:, None] & (offs_s < K // BLOCK)[None, :], SCALE)
        if SCALE == 2:
            tl.store(row_outer_ptr + offs_m.to(tl.int64) * (K // BK) + pid_k, s2o, mask=in_m)

    if DO_COL:
        NBM: tl.constexpr = BM // BLOCK
        ac = tl.reshape(ax, (NBM, BLOCK, BK))
        amax = tl.max(ac, axis=1)
        if SCALE == 2:
            o_amax = tl.max(amax, axis=0)
            s2o = tl.where(o_amax == 0.0, 1.0, tl.math.div_rn(o_amax, 2688.0))
            factor, stored = block_factors(amax, tl.math.div_rn(1.0, s2o * 6.0)[None, :], s2o[None, :],
                                           EMAX, EMAXEXP, SCALE, SCALE_ROUND)
        else:
            factor, stored = block_factors(amax, encode_factor, s2, EMAX, EMAXEXP, SCALE, SCALE_ROUND)
        a = tl.minimum(ac * factor[:, None, :], EMAX)
        k = a.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            k = uniform_bits(key_col, tl.reshape(index, (NBM, BLOCK, BK)))
        codes = quantize_code(a, k, tl.reshape(negative, (NBM, BLOCK, BK)), MANT, BIAS, INTEGER, STOCHASTIC,
                              SIGN_SHIFT)
        codes = tl.trans(tl.reshape(codes, (BM, BK)))
        if PACK:
            lo, hi = tl.split(tl.reshape(codes, (BK, BM // 2, 2)))
            offs_b = pid_m * (BM // 2) + tl.arange(0, BM // 2)
            tl.store(col_data_ptr + offs_k.to(tl.int64)[:, None] * (M // 2) + offs_b[None, :],
                     (lo | (hi << 4)).to(tl.uint8), mask=in_k[:, None] & (offs_b < M // 2)[None, :])
        else:
            tl.store(col_data_ptr + offs_k.to(tl.int64)[:, None] * M + offs_m[None, :],
                     codes.to(col_data_ptr.dtype.element_ty), mask=in_k[:, None] & in_m[None, :])
        offs_s = pid_m * NBM + tl.arange(0, NBM)
        store_scales(col_scale_ptr + offs_k.to(tl.int64)[:, None] * (M // BLOCK) + offs_s[None, :],
                     tl.trans(stored), in_k[:, None] & (offs_s < M // BLOCK)[None, :], SCALE)
        if SCALE == 2:
            tl.store(col_outer_ptr + offs_k.to(tl.int64) * (M // BM) + pid_m, s2o, mask=in_k)

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
def group_bits(key, first, pos):
    """8 random bits per element: byte ``pos`` (0..3) of hash32(first XOR key), ``first`` the source index of the
    first element of the element's group of 4 along the quantized dimension (rounding.counter_bits)."""
    h = hash32(first ^ key.to(tl.uint32))
    return ((h >> (pos * 8).to(tl.uint32)) & 255).to(tl.int32)


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

    Same function as reference.round_magnitude + encoding, computed with fewer instructions.
    Nearest-even: in the normal range, adding 2^(SHIFT-1) - 1 + lsb to the fp32 bits and dropping
    SHIFT = 23 - MANT bits rounds the mantissa, a carry moving into the exponent; what is left is the
    element code plus (127 - BIAS) << MANT. Below the smallest normal (and for INT8) the grid is uniform:
    y = a / smallest step is rounded with the 1.5*2^23 trick, whose low bits then hold the integer.
    Stochastic (k = 8 random bits r): the bits of a (below the smallest normal: of fl(a + 2^emin); INT8:
    of fl(a + 128), a format with 7 mantissa bits) plus 2^SHIFT - 1 - 2^(SHIFT-9) - r * 2^(SHIFT-8), then
    SHIFT bits dropped: rounding.round_magnitude's rule, so SR agrees bit for bit.
    """
    if STOCHASTIC:
        MS: tl.constexpr = 7 if INTEGER else MANT
        SH: tl.constexpr = 23 - MS
        ADD: tl.constexpr = (1 << SH) - 1 - (1 << (SH - 9))
        if INTEGER:
            bits = (a + 128.0).to(tl.int32, bitcast=True)
            m = ((bits + ADD - (k << (SH - 8))) >> SH) - (134 << 7)
            code = tl.where(negative, -m, m)
        else:
            LIM: tl.constexpr = 2.0 ** (1 - BIAS)
            small = a < LIM
            bits = tl.where(small, a + LIM, a).to(tl.int32, bitcast=True)
            m = ((bits + ADD - (k << (SH - 8))) >> SH) - tl.where(small, ((127 - BIAS) << MANT) + (1 << MANT),
                                                                   (127 - BIAS) << MANT)
            code = m | (negative.to(tl.int32) << SIGN_SHIFT)
        return code
    if INTEGER:
        small = (a + 12582912.0).to(tl.int32, bitcast=True) & 0xFF
        return tl.where(negative, -small, small)
    # Nearest-even with one float addition (v4): for a in binade e (e >= emin; below the smallest normal e = emin)
    # the grid step is 2^(e - MANT), and M = 1.5 * 2^(e - MANT + 23) has exactly that ulp, so fl(a + M) = M + m * step
    # with m = a / step rounded half to even (one IEEE rounding); m is the mantissa part of the code and the binade
    # adds (e - emin) << MANT. M's bits come from a's exponent field, no branch between normal and subnormal.
    EMIN: tl.constexpr = 1 - BIAS
    bits = a.to(tl.int32, bitcast=True)
    e_bits = tl.maximum(bits & 0x7F800000, (127 + EMIN) << 23)
    magic = e_bits + (((23 - MANT) << 23) + 0x400000)
    t = (a + magic.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    code = (t - magic) + ((e_bits >> (23 - MANT)) - ((127 + EMIN) << MANT))
    return code | (negative.to(tl.int32) << SIGN_SHIFT)


@triton.jit
def nvfp4_block_scale(amax, encode_factor, SCALE_ROUND: tl.constexpr, HW_CVT: tl.constexpr):
    ratio = amax * encode_factor
    if SCALE_ROUND == 2:
        ratio = ratio * 1.0625
    ratio = tl.minimum(ratio, 448.0)
    if SCALE_ROUND == 1:
        sb = round_magnitude(ratio, ratio, 3, -6, False, 2)
    elif HW_CVT:
        # cvt.rn.satfinite.e4m3x2.f32: the same round-to-nearest-even onto the E4M3 grid, in one instruction
        sb = ratio.to(tl.float8e4nv).to(tl.float32)
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
def div_by_const(a, c: tl.constexpr, FAST: tl.constexpr):
    """a / c rounded to nearest-even (IEEE) for a >= 0 and a positive constant c (127, 448, 57344, 2688).

    FAST (GPU): q0 = a * fl(1/c), then one FMA correction with the exact remainder fma(-q0, c, a): three
    instructions instead of a full division. Equal to IEEE division for every float32 mantissa (checked for these c
    in tests/formats/test_const_division.py; scale invariance covers every binade where q0 and the remainder stay
    normal, a >= 2^-100). Below 2^-100, a is scaled by 2^64 first and the quotient by 2^-64 after (exact while the
    quotient is normal, i.e. a >= c * 2^-126; below that the twin's 1/s overflows anyway). The interpreter takes div_rn.
    """
    if FAST:
        tiny = a < 7.888609052210118e-31                    # 2^-100
        a_s = tl.where(tiny, a * 18446744073709551616.0, a)  # * 2^64
        rc = tl.math.div_rn(1.0, c)
        q0 = a_s * rc
        q = tl.math.fma(tl.math.fma(-q0, c, a_s), rc, q0)
        return tl.where(tiny, q * 5.421010862427522e-20, q)  # * 2^-64
    else:
        return tl.math.div_rn(a, c)


@triton.jit
def recip_rn(s, FAST: tl.constexpr):
    """1/s rounded to nearest-even: PTX rcp.rn.f32 on the GPU (IEEE by definition, cheaper than div.rn.f32)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.rn.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.math.div_rn(1.0, s)


@triton.jit
def block_factors(amax, encode_factor, s2, EMAX: tl.constexpr, EMAXEXP: tl.constexpr, SCALE: tl.constexpr,
                  SCALE_ROUND: tl.constexpr, HW_CVT: tl.constexpr):
    """Per block: (multiplier applied to x, scale value to store). Mirrors reference.quantize."""
    if SCALE == 0:
        s = tl.where(amax == 0.0, 1.0, div_by_const(amax, EMAX, HW_CVT))
        return recip_rn(s, HW_CVT), s
    elif SCALE == 3:
        e = e8m0_exponent(amax, EMAX, EMAXEXP, SCALE_ROUND)
        return exp2i(-e), e.to(tl.float32)
    else:
        sb = nvfp4_block_scale(amax, encode_factor, SCALE_ROUND, HW_CVT)
        return recip_rn(sb * s2, HW_CVT), sb


@triton.jit
def fill_nvfp4_table(table_ptr, s2):
    """table[j] = 1 / (b_j * s2), b_j the float32 with bits (j + 944) << 20, for j in [0, 256).

    Every E4M3 block-scale value b (2^-9 <= b <= 448, at most 3 mantissa bits) is b_j for
    j = (bits(b) >> 20) - 944 (the 8 exponent and top 3 mantissa bits of its float32), so a block's
    multiplier 1/(s_b s2) is one load instead of a division, with the same IEEE-rounded value.
    Each program writes the whole table (the same values), then waits at a barrier before reading it.
    """
    j = tl.arange(0, 256)
    b = ((j + 944) << 20).to(tl.float32, bitcast=True)
    tl.store(table_ptr + j, tl.math.div_rn(1.0, b * s2))
    tl.debug_barrier()


@triton.jit
def nvfp4_table_factors(amax, encode_factor, table_ptr, SCALE_ROUND: tl.constexpr, HW_CVT: tl.constexpr):
    """Per-tensor NVFP4 blocks: (multiplier 1/(s_b s2) read from the table, s_b)."""
    sb = nvfp4_block_scale(amax, encode_factor, SCALE_ROUND, HW_CVT)
    return tl.load(table_ptr + ((sb.to(tl.int32, bitcast=True) >> 20) - 944)), sb


@triton.jit
def store_scales(ptr, values, mask, SCALE: tl.constexpr, HW_CVT: tl.constexpr):
    if SCALE == 0:
        tl.store(ptr, values, mask=mask)
    elif SCALE == 3:
        tl.store(ptr, (values.to(tl.int32) + 127).to(tl.uint8), mask=mask)
    elif HW_CVT:
        tl.store(ptr, values.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)   # exact: values are E4M3
    else:
        tl.store(ptr, fp8_bits(values, values < 0.0, 3, 7), mask=mask)


@triton.jit
def fp8_codes_asm(v, MANT: tl.constexpr):
    """v (fp32) -> E4M3 (MANT 3) or E5M2 codes via explicit cvt.rn.satfinite.*x2.f32 PTX, four per 32-bit register."""
    if MANT == 3:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [v], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1; cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [v], dtype=tl.uint8, is_pure=True, pack=4)


@triton.jit
def encode_elements(v, k, MANT: tl.constexpr, BIAS: tl.constexpr, INTEGER: tl.constexpr, STOCHASTIC: tl.constexpr,
                    SIGN_SHIFT: tl.constexpr, EMAX: tl.constexpr, CLAMP: tl.constexpr, HW_CVT: tl.constexpr):
    """Scaled values v = x * block factor (signed fp32) -> element codes, int32 in [0, 2^bits), sign included.

    RTN FP8 on sm_89+ (HW_CVT) is the hardware cvt.rn.satfinite (round to nearest even, saturating at
    +-max: the reference's clamp-then-round); RTN INT8 rounds the signed value with the 1.5*2^23 trick
    (nearest-even is odd-symmetric), whose low byte is the two's-complement code. Everything else
    goes through quantize_code on the magnitude (rounding on the fp32 bits).
    """
    if HW_CVT == 2 and not STOCHASTIC and not INTEGER and MANT != 1:
        return fp8_codes_asm(v, MANT).to(tl.int32)
    elif HW_CVT and not STOCHASTIC and not INTEGER and MANT != 1:
        if MANT == 3:
            c = v.to(tl.float8e4nv)
        else:
            c = v.to(tl.float8e5)
        return c.to(tl.uint8, bitcast=True).to(tl.int32)
    elif INTEGER and not STOCHASTIC:
        if CLAMP:
            v = tl.minimum(tl.maximum(v, -EMAX), EMAX)
        return (v + 12582912.0).to(tl.int32, bitcast=True) & 0xFF
    else:
        a = tl.abs(v)
        if CLAMP:
            a = tl.minimum(a, EMAX)
        negative = v.to(tl.int32, bitcast=True) < 0
        code = quantize_code(a, k, negative, MANT, BIAS, INTEGER, STOCHASTIC, SIGN_SHIFT)
        if INTEGER:
            code = code & 0xFF
        return code


@triton.jit
def load_tile(x_ptr, tile, n_tiles, n_k, M, K, stride_xm,
              BM: tl.constexpr, BK: tl.constexpr, RPT: tl.constexpr, VEC: tl.constexpr):
    """Tile number ``tile`` (row-major over [M/BM, K/BK]) as [NG, RPT, BK], in x's dtype; zeros past the end."""
    NG: tl.constexpr = BM // RPT
    m0 = (tile // n_k) * BM
    k0 = (tile % n_k) * BK
    rows = m0 + tl.arange(0, NG)[:, None] * RPT + tl.arange(0, RPT)[None, :]          # [NG, RPT]
    # VEC: elements per thread along K (the load's vector width; 4 x bf16 = 8 bytes)
    offs_kv = tl.max_contiguous(k0 + tl.arange(0, BK), VEC)
    mask = ((rows < M) & (tile < n_tiles))[:, :, None] & (offs_kv < K)[None, None, :]
    return tl.load(x_ptr + rows.to(tl.int64)[:, :, None] * stride_xm + offs_kv[None, None, :], mask=mask, other=0.0)


@triton.jit
def dual_quantize_kernel(
    x_ptr, M, K, stride_xm,
    row_data_ptr, row_scale_ptr, row_outer_ptr,
    col_data_ptr, col_scale_ptr, col_outer_ptr,
    amax_ptr, table_ptr, key_row, key_col,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, RPT: tl.constexpr, VEC: tl.constexpr,
    MANT: tl.constexpr, BIAS: tl.constexpr, INTEGER: tl.constexpr, PACK: tl.constexpr,
    SIGN_SHIFT: tl.constexpr, EMAX: tl.constexpr, EMAXEXP: tl.constexpr,
    SCALE: tl.constexpr, SCALE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, DO_ROW: tl.constexpr, DO_COL: tl.constexpr, HW_CVT: tl.constexpr,
    HW_ROW: tl.constexpr, HW_COL: tl.constexpr, BLOCK2D: tl.constexpr, PREFETCH: tl.constexpr,
):
    """[BM, BK] tiles of x (contiguous along K) -> row-wise and column-wise codes and scales.

    Persistent: program p handles tiles p, p + P, p + 2P, ... (P programs); with PREFETCH it loads the
    next tile into registers before it quantizes the current one, so the loads of one tile overlap the
    arithmetic of the previous one (without, the other resident programs hide the load latency).

    A tile is held as [NG, RPT, BK]: element [g, i, k] is x[m0 + g*RPT + i, k0 + k]. The load
    vectorizes along k (lanes along k, then g), and as long as NG*BK/VEC covers every thread,
    Triton keeps the whole RPT axis in each thread's registers: a column-wise block of RPT=16
    consecutive rows is then reduced, scaled, rounded and packed inside one thread (blocks of 32 or
    128 rows add a shuffle / a small cross-warp max over the [NG, BK] partial maxima). Row-wise
    blocks run along k over VEC-element register vectors and a few lanes (butterfly shuffles).
    Codes are packed into 32-bit words in registers (8 FP4 or 4 byte codes) and stored as words:
    the data pointers are int32 views of the code buffers.
    """
    n_m = tl.cdiv(M, BM)
    n_k = tl.cdiv(K, BK)
    n_tiles = n_m * n_k
    s2 = 1.0
    encode_factor = 1.0
    if SCALE == 1:
        t_amax = tl.load(amax_ptr)
        s2 = tl.where(t_amax == 0.0, 1.0, tl.math.div_rn(t_amax, 2688.0))
        encode_factor = tl.math.div_rn(1.0, s2 * 6.0)
        fill_nvfp4_table(table_ptr, s2)
    step = tl.num_programs(0)
    tile = tl.program_id(0)
    if PREFETCH:
        xin_next = load_tile(x_ptr, tile, n_tiles, n_k, M, K, stride_xm, BM, BK, RPT, VEC)
    while tile < n_tiles:      # a while loop: the interpreter (numpy >= 2.4) cannot take a runtime range() bound
        if PREFETCH:           # the next tile's registers are loaded before this tile is quantized
            xin = xin_next
            xin_next = load_tile(x_ptr, tile + step, n_tiles, n_k, M, K, stride_xm, BM, BK, RPT, VEC)
        else:
            xin = load_tile(x_ptr, tile, n_tiles, n_k, M, K, stride_xm, BM, BK, RPT, VEC)
        if BLOCK2D:
            quantize_tile_2d(xin, tile // n_k, tile % n_k, M, K, encode_factor, table_ptr,
                             row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr, key_row, key_col,
                             BM, BK, RPT, SCALE_ROUND, STOCHASTIC, DO_ROW, DO_COL)
        else:
            quantize_tile(xin, tile // n_k, tile % n_k, M, K, s2, encode_factor, table_ptr,
                          row_data_ptr, row_scale_ptr, row_outer_ptr, col_data_ptr, col_scale_ptr, col_outer_ptr,
                          key_row, key_col, BM, BK, BLOCK, RPT, MANT, BIAS, INTEGER, PACK, SIGN_SHIFT, EMAX, EMAXEXP,
                          SCALE, SCALE_ROUND, STOCHASTIC, DO_ROW, DO_COL, HW_CVT, HW_ROW, HW_COL)
        tile += step


@triton.jit
def quantize_tile(xin, pid_m, pid_k, M, K, s2, encode_factor, table_ptr,
                  row_data_ptr, row_scale_ptr, row_outer_ptr, col_data_ptr, col_scale_ptr, col_outer_ptr,
                  key_row, key_col,
                  BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, RPT: tl.constexpr,
                  MANT: tl.constexpr, BIAS: tl.constexpr, INTEGER: tl.constexpr, PACK: tl.constexpr,
                  SIGN_SHIFT: tl.constexpr, EMAX: tl.constexpr, EMAXEXP: tl.constexpr,
                  SCALE: tl.constexpr, SCALE_ROUND: tl.constexpr,
                  STOCHASTIC: tl.constexpr, DO_ROW: tl.constexpr, DO_COL: tl.constexpr, HW_CVT: tl.constexpr,
                  HW_ROW: tl.constexpr, HW_COL: tl.constexpr):
    # SCALE 0: fp32 amax/max; 1: NVFP4 with per-tensor s2; 2: NVFP4 with 1x128 s2; 3: E8M0
    NG: tl.constexpr = BM // RPT
    W: tl.constexpr = 8 if PACK else 4              # codes per 32-bit word
    CB: tl.constexpr = 4 if PACK else 8             # bits per code
    # saturate before rounding (SR can round an overshoot of a few ulps up past the max; and the clamp keeps
    # INT8's x * factor from being contracted into one FMA with the rounding constant)
    CLAMP: tl.constexpr = True
    m0 = pid_m * BM
    k0 = pid_k * BK
    offs_g = tl.arange(0, NG)
    offs_k = k0 + tl.arange(0, BK)
    rows = m0 + offs_g[:, None] * RPT + tl.arange(0, RPT)[None, :]                      # [NG, RPT]
    in_k = offs_k < K
    in_g = (m0 + offs_g * RPT) < M                                           # M is a multiple of RPT
    x = xin.to(tl.float32)
    if STOCHASTIC:
        # SR: one hash per 4 consecutive elements along the quantized dimension (rounding.counter_uniform): the row
        # operand's group starts at k & ~3, the column operand's at row & ~3; counters are source indices mod 2^32
        row_base = (rows.to(tl.uint32) * K.to(tl.uint32))[:, :, None]
        first_row = row_base + (offs_k & ~3).to(tl.uint32)[None, None, :]
        pos_row = (offs_k & 3)[None, None, :]
        first_col = ((rows & ~3).to(tl.uint32) * K.to(tl.uint32))[:, :, None] + offs_k.to(tl.uint32)[None, None, :]
        pos_col = (rows & 3)[:, :, None]

    if DO_ROW:
        NBK: tl.constexpr = BK // BLOCK
        x4 = tl.reshape(x, (NG, RPT, NBK, BLOCK))
        amax = tl.max(tl.abs(x4), axis=3)                                    # [NG, RPT, NBK]
        if SCALE == 2:
            o_amax = tl.max(amax, axis=2)                                    # BK == 128: the row's outer block
            s2o = tl.where(o_amax == 0.0, 1.0, div_by_const(o_amax, 2688.0, HW_CVT))
            factor, stored = block_factors(amax, recip_rn(s2o * 6.0, HW_CVT)[:, :, None], s2o[:, :, None],
                                           EMAX, EMAXEXP, SCALE, SCALE_ROUND, HW_CVT)
        elif SCALE == 1:
            factor, stored = nvfp4_table_factors(amax, encode_factor, table_ptr, SCALE_ROUND, HW_CVT)
        else:
            factor, stored = block_factors(amax, encode_factor, s2, EMAX, EMAXEXP, SCALE, SCALE_ROUND, HW_CVT)
        k = x4.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            k = tl.reshape(group_bits(key_row, first_row, pos_row), (NG, RPT, NBK, BLOCK))
        codes = encode_elements(x4 * factor[:, :, :, None], k, MANT, BIAS, INTEGER, STOCHASTIC, SIGN_SHIFT, EMAX,
                                CLAMP, 2 if HW_ROW else 0)
        words = tl.sum(tl.reshape(codes, (NG, RPT, BK // W, W)) << (tl.arange(0, W) * CB), axis=3)
        offs_w = k0 // W + tl.arange(0, BK // W)
        tl.store(row_data_ptr + rows.to(tl.int64)[:, :, None] * (K // W) + offs_w[None, None, :], words,
                 mask=(rows < M)[:, :, None] & (offs_w < K // W)[None, None, :])
        offs_s = pid_k * NBK + tl.arange(0, NBK)
        store_scales(row_scale_ptr + rows.to(tl.int64)[:, :, None] * (K // BLOCK) + offs_s[None, None, :], stored,
                     (rows < M)[:, :, None] & (offs_s < K // BLOCK)[None, None, :], SCALE, HW_CVT)
        if SCALE == 2:
            tl.store(row_outer_ptr + rows.to(tl.int64) * (K // BK) + pid_k, s2o, mask=rows < M)

    if DO_COL:
        GB: tl.constexpr = BLOCK // RPT                                      # row groups per column block
        NBC: tl.constexpr = NG // GB
        g_amax = tl.max(tl.abs(x), axis=1)                                   # [NG, BK], inside each thread
        if GB > 1:
            amax = tl.max(tl.reshape(g_amax, (NBC, GB, BK)), axis=1)         # [NBC, BK]
        else:
            amax = g_amax
        if SCALE == 2:
            o_amax = tl.max(amax, axis=0)                                    # BM == 128: the column's outer block
            s2o = tl.where(o_amax == 0.0, 1.0, div_by_const(o_amax, 2688.0, HW_CVT))
            factor, stored = block_factors(amax, recip_rn(s2o * 6.0, HW_CVT)[None, :], s2o[None, :],
                                           EMAX, EMAXEXP, SCALE, SCALE_ROUND, HW_CVT)
        elif SCALE == 1:
            factor, stored = nvfp4_table_factors(amax, encode_factor, table_ptr, SCALE_ROUND, HW_CVT)
        else:
            factor, stored = block_factors(amax, encode_factor, s2, EMAX, EMAXEXP, SCALE, SCALE_ROUND, HW_CVT)
        if GB > 1:
            factor = tl.reshape(tl.broadcast_to(factor[:, None, :], (NBC, GB, BK)), (NG, BK))
        k = x.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            k = group_bits(key_col, first_col, pos_col)
        # column-wise FP8 codes: explicit cvt PTX (HW_COL; Triton's fp8 cast differed from the reference here on
        # an H200, v3a), else the arithmetic path
        codes = encode_elements(x * factor[:, None, :], k, MANT, BIAS, INTEGER, STOCHASTIC, SIGN_SHIFT, EMAX,
                                CLAMP, 2 if HW_COL else 0)
        # pack each thread's RPT consecutive rows (one column) into RPT // W words, little end first
        ii = tl.arange(0, RPT)[None, :, None]
        shifted = codes << ((ii % W) * CB)
        w0 = tl.sum(tl.where(ii // W == 0, shifted, 0), axis=1)
        w1 = tl.sum(tl.where(ii // W == 1, shifted, 0), axis=1)
        if PACK:
            words = tl.join(w0, w1)                                          # [NG, BK, 2]
        else:
            w2 = tl.sum(tl.where(ii // W == 2, shifted, 0), axis=1)
            w3 = tl.sum(tl.where(ii // W == 3, shifted, 0), axis=1)
            words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (NG, BK, 4))
        NW: tl.constexpr = RPT // W
        offs_cw = (m0 // W + offs_g * NW)[:, None, None] + tl.arange(0, NW)[None, None, :]
        tl.store(col_data_ptr + offs_k.to(tl.int64)[None, :, None] * (M // W) + offs_cw, words,
                 mask=in_g[:, None, None] & in_k[None, :, None])
        offs_s = pid_m * NBC + tl.arange(0, NBC)
        store_scales(col_scale_ptr + offs_k.to(tl.int64)[None, :] * (M // BLOCK) + offs_s[:, None], stored,
                     (offs_s < M // BLOCK)[:, None] & in_k[None, :], SCALE, HW_CVT)
        if SCALE == 2:
            tl.store(col_outer_ptr + offs_k.to(tl.int64) * (M // BM) + pid_m, s2o, mask=in_k)


@triton.jit
def pack_column_words(codes, W: tl.constexpr, CB: tl.constexpr, RPT: tl.constexpr):
    """[NG, RPT, BK] codes -> [NG, BK, RPT // W] 32-bit words, each thread's RPT rows of a column, little end first."""
    ii = tl.arange(0, RPT)[None, :, None]
    shifted = codes << ((ii % W) * CB)
    w0 = tl.sum(tl.where(ii // W == 0, shifted, 0), axis=1)
    w1 = tl.sum(tl.where(ii // W == 1, shifted, 0), axis=1)
    if W == 8:
        return tl.join(w0, w1)
    else:
        w2 = tl.sum(tl.where(ii // W == 2, shifted, 0), axis=1)
        w3 = tl.sum(tl.where(ii // W == 3, shifted, 0), axis=1)
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (w0.shape[0], w0.shape[1], 4))


@triton.jit
def quantize_tile_2d(xin, pid_m, pid_k, M, K, encode_factor, table_ptr,
                     row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr, key_row, key_col,
                     BM: tl.constexpr, BK: tl.constexpr, RPT: tl.constexpr, SCALE_ROUND: tl.constexpr,
                     STOCHASTIC: tl.constexpr, DO_ROW: tl.constexpr, DO_COL: tl.constexpr):
    """NVFP4 with 16x16 blocks (weights): one E4M3 scale per (row group, 16 columns), shared by both operands.

    The row-wise and the column-wise operand use the same blocks, so their scales are the same values
    (stored [M/16, K/16] and [K/16, M/16]) and, with round-to-nearest, the same codes, transposed:
    Q(W)^T = Q(W^T). SR draws each operand's own stream. Scales take the arithmetic E4M3 rounding (one
    per 256 elements; the hardware cast is kept out of this layout, see NOTES.md).
    """
    NG: tl.constexpr = BM // RPT
    NBK: tl.constexpr = BK // 16
    m0 = pid_m * BM
    k0 = pid_k * BK
    offs_g = tl.arange(0, NG)
    offs_k = k0 + tl.arange(0, BK)
    rows = m0 + offs_g[:, None] * RPT + tl.arange(0, RPT)[None, :]                      # [NG, RPT]
    in_k = offs_k < K
    in_g = (m0 + offs_g * RPT) < M
    x = xin.to(tl.float32)
    g_amax = tl.max(tl.abs(x), axis=1)                                                    # [NG, BK]
    amax = tl.max(tl.reshape(g_amax, (NG, NBK, 16)), axis=2)                              # [NG, NBK]
    factor, sb = nvfp4_table_factors(amax, encode_factor, table_ptr, SCALE_ROUND, False)
    factor = tl.reshape(tl.broadcast_to(factor[:, :, None], (NG, NBK, 16)), (NG, BK))
    v = x * factor[:, None, :]
    k_row = v.to(tl.int32, bitcast=True)
    k_col = k_row
    if STOCHASTIC:
        first_row = (rows.to(tl.uint32) * K.to(tl.uint32))[:, :, None] + (offs_k & ~3).to(tl.uint32)[None, None, :]
        first_col = ((rows & ~3).to(tl.uint32) * K.to(tl.uint32))[:, :, None] + offs_k.to(tl.uint32)[None, None, :]
        k_row = group_bits(key_row, first_row, (offs_k & 3)[None, None, :])
        k_col = group_bits(key_col, first_col, (rows & 3)[:, :, None])
    codes = encode_elements(v, k_row, 1, 1, False, STOCHASTIC, 3, 6.0, True, 0)
    offs_b = pid_k * NBK + tl.arange(0, NBK)
    scale_mask = in_g[:, None] & (offs_b < K // 16)[None, :]
    if DO_ROW:
        words = tl.sum(tl.reshape(codes, (NG, RPT, BK // 8, 8)) << (tl.arange(0, 8) * 4), axis=3)
        offs_w = k0 // 8 + tl.arange(0, BK // 8)
        tl.store(row_data_ptr + rows.to(tl.int64)[:, :, None] * (K // 8) + offs_w[None, None, :], words,
                 mask=(rows < M)[:, :, None] & (offs_w < K // 8)[None, None, :])
        store_scales(row_scale_ptr + (pid_m * NG + offs_g).to(tl.int64)[:, None] * (K // 16) + offs_b[None, :], sb,
                     scale_mask, 1, False)
    if DO_COL:
        if STOCHASTIC:
            codes = encode_elements(v, k_col, 1, 1, False, STOCHASTIC, 3, 6.0, True, 0)
        words = pack_column_words(codes, 8, 4, RPT)                                     # [NG, BK, 2]
        offs_cw = (m0 // 8 + offs_g * (RPT // 8))[:, None, None] + tl.arange(0, RPT // 8)[None, None, :]
        tl.store(col_data_ptr + offs_k.to(tl.int64)[None, :, None] * (M // 8) + offs_cw, words,
                 mask=in_g[:, None, None] & in_k[None, :, None])
        store_scales(col_scale_ptr + offs_b.to(tl.int64)[None, :] * (M // 16) + (pid_m * NG + offs_g)[:, None], sb,
                     scale_mask, 1, False)

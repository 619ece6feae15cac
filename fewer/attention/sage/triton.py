"""Triton kernels of SageAttention2 (sm90 first; any GPU with FP8 tensor cores), and their launcher.

Three memory-bound launches quantize, then one attention kernel runs (the arithmetic mirrors
``reference.py`` step by step; every quantizer multiplies by a correctly rounded reciprocal of its scale,
one division per token or channel, and is compiled without FMA contraction so it equals the twin bit for bit):

- ``_quant_q_and_kv_stats_kernel``: Q * sm_scale * log2(e), optional Q smoothing (mean per 128 tokens), INT8 per
  group; in the same launch, per 128-token chunk, K and V column sums and V column max and min;
- ``_kv_finalize_kernel``: the chunk statistics -> K mean, V mean, V scale per channel and its reciprocal;
- ``_quant_kv_kernel``: K minus its mean -> INT8 per group; V (minus its mean) times 1/scale -> FP8, written
  transposed ([D, L], the K-major layout the FP8 wgmma needs for its B operand), keys reordered inside every 16
  (``key_slots``) to match the register order of P~; or, with ``pv_dtype='fp16'``, FP16 in V's own [L, D] layout;
- ``_attn_fwd_kernel``: K and V^T tiles by TMA on sm90, INT8 QK^T (int32 accumulation), dequantize (exact int->float;
  with per-thread/per-warp K scales one FFMA per score gives the exp2 argument), online softmax in base 2, P~ * 448 -> FP8,
  FP8 PV into a FRESH accumulator per KV block added into FP32 (FP16 P~ and V: one running FP32 accumulator, which
  the FP16 MMA keeps at full precision)
  (never ``acc = tl.dot(p, v, acc)``: Triton lets an FP8 dot keep Hopper's ~13-bit running accumulator,
  which lost ~5% rel-L1 in a measurement; see ../../../../shared/research/sageattention.md section 7).

Buffers are padded: sequence to a multiple of 128 (zeros), head dim to a power of two >= 32, so the
attention kernel loads whole tiles with no masks. Triton is imported only when this module is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.capability import triton_interpreter_on
from .config import SageConfig
from .reference import INT8_MAX, LOG2E, LOG2_P_SCALE, Q_SMOOTH_BLOCK, SCALE_FLOOR, STATS_CHUNK, V_BLOCK, fp32_scalar, stats_chunks

# The kernels spell these constants as literals (Triton globals must be constexpr); keep them in step.
assert (INT8_MAX, SCALE_FLOOR) == (127.0, 1e-12) and abs(LOG2_P_SCALE - 8.807354922057604) < 1e-12

TOKEN_TILE = 128  # tokens per quantization program; every scale group and the Q-smoothing block fit in it
assert STATS_CHUNK == V_BLOCK == TOKEN_TILE == 128   # one statistics chunk / V factor block per program

# group rule codes shared by the quantizers (see reference.group_index)
_CONTIGUOUS, _THREAD_Q, _THREAD_K = 0, 1, 2
_RULES = {  # granularity -> ((Q code, Q group size), (K code, K group size))
    "per_block": ((_CONTIGUOUS, 128), (_CONTIGUOUS, 64)),
    "per_warp": ((_CONTIGUOUS, 16), (_CONTIGUOUS, 128)),
    "per_thread": ((_THREAD_Q, 16), (_THREAD_K, 128)),
    "per_token": ((_CONTIGUOUS, 1), (_CONTIGUOUS, 1)),
}


@triton.jit
def _to_e4m3(x, EMULATE_ROUNDING: tl.constexpr):
    """Cast to FP8 E4M3 with round-to-nearest-even.

    The GPU cast already rounds to nearest even. Triton 3.6's interpreter does not carry a round-up into
    the exponent (127.3 -> 64), so under the interpreter we first round onto the E4M3 grid ourselves
    and the cast is then exact.
    """
    if EMULATE_ROUNDING:
        ax = tl.abs(x)
        exponent = ((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, -6)              # E4M3 subnormals share 2^-6's spacing
        ulp = tl.exp2((exponent - 3).to(tl.float32))     # 3 mantissa bits
        steps = ax / ulp
        steps = (steps + 12582912.0) - 12582912.0        # 1.5 * 2^23: float32 add rounds to nearest even
        x = tl.where(x < 0, -steps * ulp, steps * ulp)
    return x.to(tl.float8e4nv)


@triton.jit
def _exp2(x, FTZ: tl.constexpr):
    """2^x. With FTZ, one MUFU.EX2 (``ex2.approx.ftz.f32``); plain ``tl.exp2`` (no ftz) makes ptxas add
    range fix-ups around it. Flushing subnormal results changes nothing here: P~ <= 448 goes to FP8,
    whose smallest step is 2^-9, and the row sums are far above 2^-126."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _key_slot(key):
    """Where key ``key`` sits in the stored V^T: inside each 16 keys, offset 8h + 2t + c goes to 4t + 2h + c."""
    o = key % 16
    return key - o + 4 * ((o // 2) % 4) + 2 * (o // 8) + o % 2


@triton.jit
def _p_order(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Reorder P's keys inside each 16 as _key_slot does V's (the product P V is unchanged).

    In the wgmma accumulator layout a thread holds key columns 2t, 2t+1, 8+2t, 8+2t+1 of every 16; the 8-bit
    A operand of the PV wgmma wants four consecutive keys per thread. With both P and V in the order
    (t, h, c) instead of (h, t, c) the registers already sit where the A operand wants them, so the layout
    change needs no shuffles (the official sm90 kernel permutes V the same way)."""
    p = tl.reshape(p, (BLOCK_M, BLOCK_N // 16, 2, 4, 2))
    p = tl.permute(p, (0, 1, 3, 2, 4))
    return tl.reshape(p, (BLOCK_M, BLOCK_N))


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int32).to(tl.int8)


@triton.jit
def _mul_rn(a, b, EMULATE: tl.constexpr):
    """a * b rounded on its own (``mul.rn`` is never contracted into an FMA with the rounding's + 0.5), for a
    kernel that keeps FMA contraction on elsewhere. a and b have one shape."""
    if EMULATE:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _group_amax(row_amax, RULE: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr):
    """Max of ``row_amax`` [TILE] over each token's scale group, broadcast back to [TILE]."""
    if RULE == 0:  # contiguous groups of GROUP tokens
        g = tl.max(tl.reshape(row_amax, (TILE // GROUP, GROUP)), axis=1)
        out = tl.reshape(tl.broadcast_to(tl.expand_dims(g, 1), (TILE // GROUP, GROUP)), (TILE,))
    elif RULE == 1:  # rows r and r+8 of each 16-row warp tile
        g = tl.max(tl.reshape(row_amax, (TILE // 16, 2, 8)), axis=1)
        out = tl.reshape(tl.broadcast_to(tl.expand_dims(g, 1), (TILE // 16, 2, 8)), (TILE,))
    else:  # inside each 128-key block, keys with equal (row mod 8) div 2
        x = tl.reshape(row_amax, (TILE // 128, 16, 4, 2))
        g = tl.max(tl.max(x, axis=3), axis=1)                       # [TILE/128, 4]
        g = tl.broadcast_to(tl.expand_dims(tl.expand_dims(g, 1), 3), (TILE // 128, 16, 4, 2))
        out = tl.reshape(g, (TILE,))
    return out


@triton.jit
def _token_tile(ptr, bh, heads, tile, L, D, s_b, s_h, s_l, TILE: tl.constexpr, D_P: tl.constexpr):
    """Rows, columns, bounds mask and element pointers of token tile ``tile`` ([TILE, D_P]) of head ``bh``
    (= batch * heads + head) of a strided [B, heads, L, D] tensor."""
    rows = tile * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, D_P)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    src = ptr + (bh // heads) * s_b + (bh % heads) * s_h + rows[:, None] * s_l + cols[None, :]
    return rows, cols, mask, src


@triton.jit
def _quant_q_tile(q_ptr, q8_ptr, qs_ptr, qmean_ptr, tile, bh, L, D, H, L_PAD, N_SMOOTH, c, s_qb, s_qh, s_ql,
                  RULE: tl.constexpr, GROUP: tl.constexpr, SMOOTH: tl.constexpr, EVEN: tl.constexpr,
                  TILE: tl.constexpr, D_P: tl.constexpr):
    """Q tile -> Q * c (c = sm_scale * log2(e)), optionally minus its mean, INT8 per group.
    EVEN: L is a multiple of TILE and D == D_P, so no masks are needed."""
    rows, cols, mask, src = _token_tile(q_ptr, bh, H, tile, L, D, s_qb, s_qh, s_ql, TILE, D_P)
    if EVEN:
        x = tl.load(src)
    else:
        x = tl.load(src, mask=mask, other=0.0)
    x = x.to(tl.float32) * c
    if SMOOTH:  # TILE == Q_SMOOTH_BLOCK: one mean per program
        count = tl.minimum(L - tile * TILE, TILE).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        tl.store(qmean_ptr + (bh * N_SMOOTH + tile) * D_P + cols, mean)
        if EVEN:
            x = x - mean[None, :]
        else:
            x = tl.where(mask, x - mean[None, :], 0.0)
    amax = _group_amax(tl.max(tl.abs(x), axis=1), RULE, GROUP, TILE)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    inv = tl.math.div_rn(1.0, scale)        # one correctly rounded division per token, then multiplies
    q8 = _round_half_away(x * inv[:, None])
    tl.store(q8_ptr + (bh * L_PAD + rows[:, None]) * D_P + cols[None, :], q8)
    tl.store(qs_ptr + bh * L_PAD + rows, scale)


@triton.jit
def _kv_stats_tile(k_ptr, v_ptr, ksum_ptr, vsum_ptr, vmax_ptr, vmin_ptr, slot, chunk, bh, L, D, HK, N_SLOTS,
                   s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, EVEN: tl.constexpr, TILE: tl.constexpr, D_P: tl.constexpr):
    """One 128-token chunk (the ``slot``-th sampled one): column sums of K and V, column max and min of V."""
    rows, cols, mask, k_src = _token_tile(k_ptr, bh, HK, chunk, L, D, s_kb, s_kh, s_kl, TILE, D_P)
    v_src = _token_tile(v_ptr, bh, HK, chunk, L, D, s_vb, s_vh, s_vl, TILE, D_P)[3]
    out = (bh * N_SLOTS + slot) * D_P + cols
    if EVEN:
        k = tl.load(k_src)
        v = tl.load(v_src).to(tl.float32)
        v_hi = v
        v_lo = v
    else:
        k = tl.load(k_src, mask=mask, other=0.0)
        v = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
        v_hi = tl.where(mask, v, float("-inf"))
        v_lo = tl.where(mask, v, float("inf"))
    tl.store(ksum_ptr + out, tl.sum(k.to(tl.float32), axis=0))
    tl.store(vsum_ptr + out, tl.sum(v, axis=0))
    tl.store(vmax_ptr + out, tl.max(v_hi, axis=0))
    tl.store(vmin_ptr + out, tl.min(v_lo, axis=0))


@triton.jit
def _quant_q_and_kv_stats_kernel(q_ptr, q8_ptr, qs_ptr, qmean_ptr, k_ptr, v_ptr, ksum_ptr, vsum_ptr, vmax_ptr,
                                 vmin_ptr, LQ, LK, D, H, HK, LQ_PAD, N_SMOOTH, N_Q_TILES, N_STATS, STRIDE, N_QHEADS, c,
                                 s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                                 RULE: tl.constexpr, GROUP: tl.constexpr, SMOOTH: tl.constexpr,
                                 EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, TILE: tl.constexpr, D_P: tl.constexpr):
    """The first pass, one launch: programs (tile, head < B*H) quantize Q; programs (i, B*H + head) gather
    the K/V statistics of chunk i * STRIDE (N_STATS chunks per head: all, or an evenly spaced sample).
    Q needs no global statistic, so it is done while K and V are read for their means."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if head < N_QHEADS:
        if tile < N_Q_TILES:
            _quant_q_tile(q_ptr, q8_ptr, qs_ptr, qmean_ptr, tile, head, LQ, D, H, LQ_PAD, N_SMOOTH, c,
                          s_qb, s_qh, s_ql, RULE, GROUP, SMOOTH, EVEN_Q, TILE, D_P)
    else:
        if tile < N_STATS:
            _kv_stats_tile(k_ptr, v_ptr, ksum_ptr, vsum_ptr, vmax_ptr, vmin_ptr, tile, tile * STRIDE, head - N_QHEADS,
                           LK, D, HK, N_STATS, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, EVEN_K, TILE, D_P)


@triton.jit
def _kv_finalize_kernel(ksum_ptr, vsum_ptr, vmax_ptr, vmin_ptr, kmean_ptr, vmean_ptr, vscale_ptr, vinv_ptr,
                        N_TOKENS, N_CHUNKS, v_range,
                        SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, K_GIVEN: tl.constexpr,
                        V_GIVEN: tl.constexpr, CH: tl.constexpr, DC: tl.constexpr, D_P: tl.constexpr):
    """Per head and DC channels: reduce the chunk statistics (N_CHUNKS rows, N_TOKENS tokens) -> K mean, V mean,
    V scale and its reciprocal.

    max |V - mean| per channel comes from the column max and min (float rounding is monotonic, so it equals
    the twin's max over tokens bit for bit). ``*_GIVEN``: the caller wrote that mean (tests)."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * DC + tl.arange(0, DC)
    ksum = tl.zeros([DC], tl.float32)
    vsum = tl.zeros([DC], tl.float32)
    vhi = tl.full([DC], float("-inf"), tl.float32)
    vlo = tl.full([DC], float("inf"), tl.float32)
    for c0 in range(0, N_CHUNKS, CH):
        chunks = c0 + tl.arange(0, CH)
        keep = (chunks < N_CHUNKS)[:, None]
        off = (bh * N_CHUNKS + chunks[:, None]) * D_P + cols[None, :]
        if SMOOTH_K and not K_GIVEN:
            ksum += tl.sum(tl.load(ksum_ptr + off, mask=keep, other=0.0), axis=0)
        if SMOOTH_V and not V_GIVEN:
            vsum += tl.sum(tl.load(vsum_ptr + off, mask=keep, other=0.0), axis=0)
        vhi = tl.maximum(vhi, tl.max(tl.load(vmax_ptr + off, mask=keep, other=float("-inf")), axis=0))
        vlo = tl.minimum(vlo, tl.min(tl.load(vmin_ptr + off, mask=keep, other=float("inf")), axis=0))
    if SMOOTH_K and not K_GIVEN:
        tl.store(kmean_ptr + bh * D_P + cols, ksum / N_TOKENS)
    centre = tl.zeros([DC], tl.float32)
    if SMOOTH_V:
        if V_GIVEN:
            centre = tl.load(vmean_ptr + bh * D_P + cols)
        else:
            centre = vsum / N_TOKENS
            tl.store(vmean_ptr + bh * D_P + cols, centre)
    absmax = tl.maximum(vhi - centre, centre - vlo)
    scale = tl.math.div_rn(tl.maximum(absmax, 1e-12), v_range)
    tl.store(vscale_ptr + bh * D_P + cols, scale)
    tl.store(vinv_ptr + bh * D_P + cols, tl.math.div_rn(1.0, scale))


@triton.jit
def _quant_kv_kernel(k_ptr, v_ptr, kmean_ptr, vmean_ptr, vinv_ptr, k8_ptr, ks_ptr, vq_ptr, vr_ptr, v_range,
                     L, D, HK, L_PAD, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                     RULE: tl.constexpr, GROUP: tl.constexpr, SMOOTH: tl.constexpr, SMOOTH_V: tl.constexpr,
                     V_BLOCK: tl.constexpr, V_FP16: tl.constexpr, EMULATE_FP8: tl.constexpr, EVEN: tl.constexpr,
                     TILE: tl.constexpr, D_P: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows, cols, mask, k_src = _token_tile(k_ptr, bh, HK, tile, L, D, s_kb, s_kh, s_kl, TILE, D_P)
    v_src = _token_tile(v_ptr, bh, HK, tile, L, D, s_vb, s_vh, s_vl, TILE, D_P)[3]
    if EVEN:
        k = tl.load(k_src).to(tl.float32)
    else:
        k = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        k = k - tl.load(kmean_ptr + bh * D_P + cols)[None, :]
        if not EVEN:   # padding stays zero (the group absmax and the padded tiles)
            k = tl.where(mask, k, 0.0)
    amax = _group_amax(tl.max(tl.abs(k), axis=1), RULE, GROUP, TILE)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    inv = tl.math.div_rn(1.0, scale)        # one correctly rounded division per token, then multiplies
    k8 = _round_half_away(k * inv[:, None])
    tl.store(k8_ptr + (bh * L_PAD + rows[:, None]) * D_P + cols[None, :], k8)
    tl.store(ks_ptr + bh * L_PAD + rows, scale)
    if EVEN:
        v = tl.load(v_src).to(tl.float32)
    else:
        v = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH_V:
        v = v - tl.load(vmean_ptr + bh * D_P + cols)[None, :]
        if not EVEN:
            v = tl.where(mask, v, 0.0)
    v = v * tl.load(vinv_ptr + bh * D_P + cols)[None, :]
    if V_BLOCK:   # this tile's own factor: its largest scaled magnitude over the range (TILE == V_BLOCK keys)
        r = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(v), axis=1), axis=0), 1e-12), v_range)
        r_inv = tl.math.div_rn(1.0, r)
        v = v * r_inv
        tl.store(vr_ptr + (bh * (L_PAD // TILE) + tile) * 2, r)          # (factor, its reciprocal) pairs
        tl.store(vr_ptr + (bh * (L_PAD // TILE) + tile) * 2 + 1, r_inv)
    if V_FP16:  # FP16 PV: V in its natural [L, D] layout (16-bit wgmma operands need no reordering)
        tl.store(vq_ptr + (bh * L_PAD + rows[:, None]) * D_P + cols[None, :], v.to(tl.float16))
    else:
        v8 = _to_e4m3(v, EMULATE_FP8)
        # transposed ([D, L]) and, inside every 16 keys, in the order the attention kernel lays out P (_key_slot);
        # reordered in registers so that each channel's keys are stored contiguously (16-byte stores)
        v8 = _p_order(tl.trans(v8), D_P, TILE)
        tl.store(vq_ptr + (bh * D_P + cols[:, None]) * L_PAD + rows[None, :], v8)


@triton.jit
def _attn_block(acc, l_i, m_i, r_prev, q, qs, k_base, ks_base, vt_base, vr_base, ds_base, start_n, rows, L_K, L_PAD,
                k_row, vt_row, USE_TMA: tl.constexpr, V_BLOCK: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr, ACCUM: tl.constexpr,
                EXP2_FP16: tl.constexpr, EXP2_FTZ: tl.constexpr, EMULATE_FP8: tl.constexpr, GROUP4: tl.constexpr,
                I2F: tl.constexpr, V_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D_P: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_P)
    if V_BLOCK:   # V's (factor, 1/factor) of this block, loaded first so the loads land during QK^T and the softmax
        r = tl.load(vr_base + (start_n // 128) * 2)        # (no division in the kernel: its slow path spills)
        r_inv = tl.load(vr_base + (start_n // 128) * 2 + 1)
    if USE_TMA:   # k_base, vt_base: tensor descriptors of K [B*Hk*LK_PAD, D_P] and V^T [B*Hk*D_P, LK_PAD]
        k = k_base.load([k_row + start_n, 0])
    else:         # k_base, vt_base: pointers to this head's K and V^T
        k = tl.load(k_base + cols[:, None] * D_P + dims[None, :])
    # int32 -> float32 without I2F (a quarter-rate conversion on sm90): |s_int| < 127*127*256 < 2^22, so the
    # bit pattern s_int + bits(1.5*2^23) is the float 1.5*2^23 + s_int exactly (Triton folds the add into the
    # MMA's initial accumulator), and x - 1.5*2^23 is s_int exactly
    if I2F and GROUP4 and not MASKED:   # benchmark knob: plain int -> float conversion (I2FP) instead
        x = tl.dot(q, tl.trans(k)).to(tl.float32)
        magic = 0.0
    else:
        x = (tl.dot(q, tl.trans(k)) + 0x4B400000).to(tl.float32, bitcast=True)
        magic = 12582912.0
    if GROUP4 and not MASKED:
        # per_thread / per_warp K scales: inside a block the K scale depends only on (key mod 8) div 2, which is
        # what one thread of the MMA layout holds. Row max on the raw scores of each group, then one FFMA per
        # score: s*qs*ks - shift = x*c + (-(1.5*2^23*c) - shift), c = qs*ks (scores off by <= ~1 unit of c)
        ks4 = tl.load(ks_base + start_n + 2 * tl.arange(0, 4))
        c4 = qs[:, None] * ks4[None, :]                                           # [BLOCK_M, 4]
        x4 = tl.reshape(x, (BLOCK_M, BLOCK_N // 8, 4, 2))
        x_max = tl.max(tl.max(x4, axis=3), axis=1)                                # [BLOCK_M, 4]
        m_new = tl.maximum(m_i, tl.max((x_max - magic) * c4, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m_safe - 8.807354922057604      # log2(448): P~ comes out scaled to [0, 448]
        bias4 = -(c4 * magic + shift[:, None])
        arg = tl.fma(x4, tl.expand_dims(tl.expand_dims(c4, 1), 3), tl.expand_dims(tl.expand_dims(bias4, 1), 3))
        arg = tl.reshape(arg, (BLOCK_M, BLOCK_N))
    else:
        ks = tl.load(ks_base + cols)
        t = (x - 12582912.0) * ks[None, :]
        if MASKED:
            keep = cols[None, :] < L_K
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            t = tl.where(keep, t, float("-inf"))
        if SMOOTH_Q:
            s = t * qs[:, None] + tl.load(ds_base + cols)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        else:
            m_new = tl.maximum(m_i, tl.max(t, axis=1) * qs)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m_safe - 8.807354922057604      # log2(448): P~ comes out scaled to [0, 448]
        if SMOOTH_Q:
            arg = s - shift[:, None]
        else:
            arg = t * qs[:, None] - shift[:, None]
    if EXP2_FP16:
        arg = arg.to(tl.float16)
        if EMULATE_FP8:  # the interpreter has no PTX: same rounding, exact exp2
            p = tl.exp2(arg.to(tl.float32)).to(tl.float16)
        else:
            p = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [arg], dtype=tl.float16,
                                          is_pure=True, pack=2)
    else:
        p = _exp2(arg, EXP2_FTZ)
    alpha = _exp2(m_i - m_safe, EXP2_FTZ)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    if V_BLOCK:   # the accumulator is kept in units of this block's V factor: the change rides on alpha (per row)
        alpha_acc = alpha * (r_prev * r_inv)
    else:
        r = r_prev
        alpha_acc = alpha
    if V_FP16:   # 16-bit PV: P~ in FP16 keeps the accumulator layout; V [L, D] in natural key order
        pa = p.to(tl.float16)
        if USE_TMA:
            vb = vt_base.load([k_row + start_n, 0])                         # [BLOCK_N, D_P]
        else:
            vb = tl.load(vt_base + cols[:, None] * D_P + dims[None, :])
    else:
        p = _p_order(p, BLOCK_M, BLOCK_N)       # V^T is stored in the same key order
        if EXP2_FP16 and not EMULATE_FP8:
            pa = p.to(tl.float8e4nv)
        else:
            pa = _to_e4m3(p.to(tl.float32), EMULATE_FP8)
        if USE_TMA:
            vt = vt_base.load([vt_row, start_n])                            # [D_P, BLOCK_N], keys contiguous
        else:
            vt = tl.load(vt_base + dims[:, None] * L_PAD + cols[None, :])
        vb = tl.trans(vt)
    if ACCUM == 0 and not V_FP16:   # two-level: fresh FP32 accumulator per KV block
        acc = acc * alpha_acc[:, None] + tl.dot(pa, vb)
    elif ACCUM == 2:  # SageAttention2++: FP16 accumulator per KV block
        acc = acc * alpha_acc[:, None] + tl.dot(pa, vb, out_dtype=tl.float16).to(tl.float32)
    else:             # one running accumulator: the FP8 ablation; for FP16 operands the MMA accumulates in
        acc = tl.dot(pa, vb, acc * alpha_acc[:, None])     # full FP32, so this is the two-level arithmetic
    return acc, l_i, m_safe, r


@triton.jit
def _attn_fwd_kernel(q8_ptr, qs_ptr, k8_ptr, ks_ptr, vt_ptr, vs_ptr, vr_ptr, vm_ptr, ds_ptr, o_ptr, lse_ptr,
                     L_Q, L_K, LQ_PAD, LK_PAD, H, HK, D, N_SMOOTH,
                     s_ob, s_oh, s_ol, s_qb, s_qh, s_ql, c,
                     FUSE_Q: tl.constexpr, Q_RULE: tl.constexpr, Q_GROUP: tl.constexpr, Q_FULL_D: tl.constexpr,
                     USE_TMA: tl.constexpr, V_BLOCK: tl.constexpr, IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr,
                     SMOOTH_V: tl.constexpr, ACCUM: tl.constexpr, EXP2_FP16: tl.constexpr, EXP2_FTZ: tl.constexpr, EMULATE_FP8: tl.constexpr, GROUP4: tl.constexpr,
                     I2F: tl.constexpr, V_FP16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D_P: tl.constexpr, Q_SMOOTH: tl.constexpr):
    if IS_CAUSAL:   # the longest rows (the last query blocks) first, so the final wave is made of short ones
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // (H // HK)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_P)
    if FUSE_Q:   # q8_ptr is the caller's Q: quantize this tile here (the twin's quantize_q, same arithmetic)
        if Q_FULL_D:    # no column mask: the row mask alone keeps 16-byte loads
            q_mask = (rows[:, None] < L_Q) & (dims[None, :] < D_P)
        else:
            q_mask = (rows[:, None] < L_Q) & (dims[None, :] < D)
        x = tl.load(q8_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + dims[None, :], mask=q_mask, other=0.0)
        x = x.to(tl.float32) * c
        amax = _group_amax(tl.max(tl.abs(x), axis=1), Q_RULE, Q_GROUP, BLOCK_M)
        qs = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
        inv = tl.broadcast_to(tl.expand_dims(tl.math.div_rn(1.0, qs), 1), (BLOCK_M, D_P))
        q = _round_half_away(_mul_rn(x, inv, EMULATE_FP8))
    else:
        q = tl.load(q8_ptr + (bh * LQ_PAD + rows[:, None]) * D_P + dims[None, :])
        qs = tl.load(qs_ptr + bh * LQ_PAD + rows)
    k_row = bhk * LK_PAD        # first row of this head in the K / V^T descriptors (TMA)
    vt_row = bhk * D_P
    if USE_TMA:
        k_base = k8_ptr
        vt_base = vt_ptr
    else:   # V^T [D_P, LK_PAD] (FP8) or V [LK_PAD, D_P] (FP16): the same number of elements per head
        k_base = k8_ptr + bhk * LK_PAD * D_P
        vt_base = vt_ptr + bhk * D_P * LK_PAD
    ks_base = ks_ptr + bhk * LK_PAD
    vr_base = vr_ptr + bhk * (LK_PAD // 128) * 2    # V's (factor, 1/factor) per 128 keys (V_BLOCK; else a placeholder)
    if V_BLOCK:
        r_i = tl.load(vr_base)                  # the accumulator's unit (the first block's factor)
    else:
        r_i = tl.load(vr_ptr)                   # unused (a float from the placeholder, for the loop's types)
    ds_base = ds_ptr + (bh * N_SMOOTH + start_m // Q_SMOOTH) * LK_PAD
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    # KV blocks that need no mask, then the ones that do (the causal diagonal, the ragged last block)
    full_end = (L_K // BLOCK_N) * BLOCK_N
    end = L_K
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, (start_m // BLOCK_N) * BLOCK_N)
        end = tl.minimum(L_K, start_m + BLOCK_M)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i, r_i = _attn_block(acc, l_i, m_i, r_i, q, qs, k_base, ks_base, vt_base, vr_base, ds_base,
                                         start_n, rows, L_K, LK_PAD, k_row, vt_row, USE_TMA, V_BLOCK, False, IS_CAUSAL, SMOOTH_Q, ACCUM, EXP2_FP16, EXP2_FTZ,
                                    EMULATE_FP8, GROUP4, I2F, V_FP16, BLOCK_M, BLOCK_N, D_P)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i, r_i = _attn_block(acc, l_i, m_i, r_i, q, qs, k_base, ks_base, vt_base, vr_base, ds_base,
                                         start_n, rows, L_K, LK_PAD, k_row, vt_row, USE_TMA, V_BLOCK, True, IS_CAUSAL, SMOOTH_Q, ACCUM, EXP2_FP16, EXP2_FTZ,
                                    EMULATE_FP8, GROUP4, I2F, V_FP16, BLOCK_M, BLOCK_N, D_P)
    inv_l = 1.0 / l_i
    if V_BLOCK:
        inv_l = inv_l * r_i
    v_scale = tl.load(vs_ptr + bhk * D_P + dims)
    out = acc * inv_l[:, None] * v_scale[None, :]
    if SMOOTH_V:
        out = out + tl.load(vm_ptr + bhk * D_P + dims)[None, :]
    keep = (rows[:, None] < L_Q) & (dims[None, :] < D)
    tl.store(o_ptr + b * s_ob + h * s_oh + rows[:, None] * s_ol + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=keep)
    tl.store(lse_ptr + bh * L_Q + rows, m_i + tl.log2(l_i) - 8.807354922057604, mask=rows < L_Q)


_interpreter_patched = False


def _patch_interpreter_scalar_index() -> None:
    """Let Triton 3.6's interpreter use a runtime int as a ``range`` bound under NumPy 2.4.

    The interpreter stores scalar arguments as 1-element arrays and converts them with ``int(array)``,
    which NumPy 2.4 refuses for arrays that are not 0-d. Only the interpreter (TRITON_INTERPRET=1) is
    touched, once; compiled kernels are unaffected.
    """
    global _interpreter_patched
    if _interpreter_patched or not triton_interpreter_on():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _interpreter_patched = True


def key_slots(n: int, device=None) -> torch.Tensor:
    """Column of each of ``n`` keys in the stored V^T (the order ``_key_slot`` writes, for tests and tools)."""
    key = torch.arange(n, device=device)
    o = key % 16
    return key - o + 4 * ((o // 2) % 4) + 2 * (o // 8) + o % 2


def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 32): tl.dot tiles need power-of-two sizes and INT8 MMAs a K of 32."""
    return max(32, 1 << (d - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# launch settings of the quantization kernels (NOTES_sage.md v5): warps per program
QUANT_WARPS = {"first_pass": 4, "finalize": 4, "kv": 4}


def quantize_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, config: SageConfig,
                    *, k_mean: torch.Tensor | None = None, v_mean: torch.Tensor | None = None,
                    warps: dict[str, int] | None = None, quantize_q: bool = True) -> dict[str, torch.Tensor | None]:
    """Quantize [B, H, L, D] views in three launches. Returns padded buffers (see module doc).

    1. one kernel quantizes Q and gathers per-chunk K/V statistics (sums, V max/min) over all chunks or, with
       ``config.v_block_scale``, over at most ``config.stats_chunks`` evenly spaced ones (``reference.stats_chunks``);
    2. a small kernel reduces them to the K mean, V mean, V scale and its reciprocal;
    3. one kernel quantizes K and V (V^T in FP8 with the key order of ``key_slots``, or V in FP16), with
       ``v_block_scale`` dividing each 128-key block of V by its own factor (``v_factor``, [B*Hk, LK_PAD/128, 2]:
       the factor and its reciprocal).
    ``k_mean``/``v_mean`` ([B, Hk, 1, D]) override the computed means (tests use them to compare with the
    twin bit for bit; the kernels sum in another order than torch.mean). ``warps`` overrides QUANT_WARPS.
    ``quantize_q=False`` leaves Q to the attention kernel (``q8`` None; ``q_src`` and ``q_c`` instead).
    """
    _patch_interpreter_scalar_index()
    nw = dict(QUANT_WARPS, **(warps or {}))
    bsz, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    d_p = padded_head_dim(d)
    lq_pad, lk_pad = _round_up(lq, TOKEN_TILE), _round_up(lk, TOKEN_TILE)
    dev = q.device
    emulate = triton_interpreter_on()
    (q_rule, q_group), (k_rule, k_group) = _RULES[config.qk_granularity]
    n_chunks, n_q_tiles = lk_pad // TOKEN_TILE, lq_pad // TOKEN_TILE
    n_stats, stride = stats_chunks(lk, config.stats_chunks)
    n_tokens = lk if n_stats == n_chunks else n_stats * STATS_CHUNK
    n_smooth = lq_pad // Q_SMOOTH_BLOCK
    f32 = dict(device=dev, dtype=torch.float32)
    ksum = torch.empty(bsz * hk, n_stats, d_p, **f32)
    vsum, vmax, vmin = torch.empty_like(ksum), torch.empty_like(ksum), torch.empty_like(ksum)
    if quantize_q:
        q8 = torch.empty(bsz * hq, lq_pad, d_p, device=dev, dtype=torch.int8)
        q_scale = torch.empty(bsz * hq, lq_pad, **f32)
    elif config.smooth_q:
        raise ValueError("Q smoothing needs the Q quantizer (its block means): quantize_q=False is not allowed")
    else:   # placeholders of the right types; the first pass then only gathers K/V statistics
        q8 = torch.empty(1, device=dev, dtype=torch.int8)
        q_scale = torch.empty(1, **f32)
    q_heads = bsz * hq if quantize_q else 0
    q_mean = torch.empty(bsz * hq, n_smooth, d_p, **f32) if config.smooth_q else None
    # no FMA contraction in the quantizers: x * inv + 0.5 must round twice, as in the twin
    _quant_q_and_kv_stats_kernel[(max(n_q_tiles if quantize_q else 0, n_stats), q_heads + bsz * hk)](
        q, q8, q_scale, q_mean if q_mean is not None else q_scale, k, v, ksum, vsum, vmax, vmin,
        lq, lk, d, hq, hk, lq_pad, n_smooth, n_q_tiles, n_stats, stride, q_heads, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        RULE=q_rule, GROUP=q_group, SMOOTH=config.smooth_q, EVEN_Q=lq % TOKEN_TILE == 0 and d == d_p,
        EVEN_K=lk % TOKEN_TILE == 0 and d == d_p, TILE=TOKEN_TILE, D_P=d_p,
        num_warps=nw["first_pass"], enable_fp_fusion=False)
    k_given, v_given = k_mean is not None, v_mean is not None
    kmean_buf = torch.empty(bsz * hk, d_p, **f32)   # written by the finalize kernel unless given
    vmean_buf = torch.empty(bsz * hk, d_p, **f32)
    if k_given:
        kmean_buf.zero_()[:, :d] = k_mean.reshape(bsz * hk, d).float()
    if v_given:
        vmean_buf.zero_()[:, :d] = v_mean.reshape(bsz * hk, d).float()
    v_scale, v_inv = torch.empty(bsz * hk, d_p, **f32), torch.empty(bsz * hk, d_p, **f32)
    _kv_finalize_kernel[(bsz * hk, d_p // 32)](
        ksum, vsum, vmax, vmin, kmean_buf, vmean_buf, v_scale, v_inv, float(n_tokens), n_stats,
        float(config.resolved_v_scale_max),
        SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v, K_GIVEN=k_given, V_GIVEN=v_given, CH=64, DC=32,
        D_P=d_p, num_warps=nw["finalize"])
    k8 = torch.empty(bsz * hk, lk_pad, d_p, device=dev, dtype=torch.int8)
    k_scale = torch.empty(bsz * hk, lk_pad, **f32)
    fp16_v = config.pv_dtype == "fp16"
    if fp16_v:
        v_q = torch.empty(bsz * hk, lk_pad, d_p, device=dev, dtype=torch.float16)
    else:
        v_q = torch.empty(bsz * hk, d_p, lk_pad, device=dev, dtype=torch.float8_e4m3fn)
    v_factor = torch.empty(bsz * hk, n_chunks, 2, **f32) if config.v_block_scale else None
    _quant_kv_kernel[(n_chunks, bsz * hk)](
        k, v, kmean_buf, vmean_buf, v_inv, k8, k_scale, v_q, v_factor if v_factor is not None else v_inv,
        float(config.resolved_v_scale_max), lk, d, hk, lk_pad,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        RULE=k_rule, GROUP=k_group, SMOOTH=config.smooth_k, SMOOTH_V=config.smooth_v,
        V_BLOCK=config.v_block_scale, V_FP16=fp16_v,
        EMULATE_FP8=emulate, EVEN=lk % TOKEN_TILE == 0 and d == d_p, TILE=TOKEN_TILE, D_P=d_p,
        num_warps=nw["kv"], enable_fp_fusion=False)
    if not quantize_q:
        q8 = q_scale = None
    return dict(q8=q8, q_scale=q_scale, q_mean=q_mean, q_src=q, q_c=sm_scale * LOG2E, k8=k8, k_scale=k_scale,
                v_t=None if fp16_v else v_q, v16=v_q if fp16_v else None, v_scale=v_scale, v_factor=v_factor,
                k_mean=kmean_buf if config.smooth_k else None, v_mean=vmean_buf if config.smooth_v else None)


def _delta_s(q_mean: torch.Tensor, k: torch.Tensor, k_mean: torch.Tensor | None, bsz: int, hq: int,
             lk_pad: int) -> torch.Tensor:
    """Q-smoothing correction mean_q @ (K - mean_K)^T in float32, [B*H, n_blocks, LK_PAD] (zero padded)."""
    hk, lk, d = k.shape[1], k.shape[2], k.shape[3]
    keys = k.float()
    if k_mean is not None:
        keys = keys - k_mean[:, :d].reshape(bsz, hk, 1, d)
    n_blocks = q_mean.shape[1]
    qm = q_mean[..., :d].reshape(bsz, hk, (hq // hk) * n_blocks, d)
    delta = torch.zeros(bsz * hq, n_blocks, lk_pad, device=k.device, dtype=torch.float32)
    delta[..., :lk] = (qm @ keys.transpose(-1, -2)).reshape(bsz * hq, n_blocks, lk)
    return delta


def attend_triton(buffers: dict[str, torch.Tensor | None], out: torch.Tensor, lq: int, lk: int, *,
                  is_causal: bool, config: SageConfig, delta_s: torch.Tensor | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, exp2_ftz: bool = True,
                  group4: bool | None = None, maxnreg: int | None = None, use_tma: bool | None = None,
                  i2f: bool = False) -> torch.Tensor:
    """Launch the attention kernel on quantized buffers; writes ``out`` [B, H, Lq, D] (a view, any strides).

    ``exp2_ftz=False`` keeps Triton's own exp2 (for benchmarking the difference); the interpreter always uses it.
    ``group4`` (default: wherever it applies) uses the per-thread-group K scales in the interior blocks: one
    FFMA per score instead of an FADD, an FMUL and an FFMA; ``False`` forces the per-token scale path.
    ``use_tma`` (default: on sm90+ for padded head dims <= 128) loads K and V^T tiles by tensor descriptors.
    ``i2f`` (benchmark knob) converts the interior scores with I2FP instead of the 1.5*2^23 bit trick.
    ``maxnreg`` caps registers per thread (benchmark knob; 168 lets three 128-thread programs share an SM).

    Returns the base-2 LSE of the smoothed scores, [B, H, Lq] float32.
    """
    bsz, hq, d = out.shape[0], out.shape[1], out.shape[3]
    hk = buffers["k8"].shape[0] // bsz
    lq_pad, lk_pad, d_p = _round_up(lq, TOKEN_TILE), buffers["k8"].shape[1], buffers["k8"].shape[2]
    lse2 = torch.empty(bsz, hq, lq, device=out.device, dtype=torch.float32)
    accum = {"fp32+fp32": 0, "fp32": 1, "fp32+fp16": 2}[config.pv_accumulation]
    grid = (triton.cdiv(lq, config.block_m), bsz * hq)
    if num_warps is None:
        num_warps = 4 if config.block_m <= 64 else 8
    if use_tma is None:   # TMA (Hopper's bulk tensor copies) for the K and V tiles; rows of at most 128 bytes
        use_tma = d_p <= 128 and (triton_interpreter_on() or torch.cuda.get_device_capability(out.device)[0] >= 9)
    fp16_v = config.pv_dtype == "fp16"
    if num_stages is None and maxnreg is None and use_tma and d_p == 128 and config.block_m == 64 and num_warps == 4 \
            and not fp16_v:
        # two K/V stages (75 KB of shared memory) and at most 168 registers (no spills with TMA loads): three
        # programs per SM instead of two, so one program's softmax overlaps the others' MMAs (NOTES_sage.md v4)
        num_stages, maxnreg = 2, 168
    if num_stages is None:
        num_stages = 3 if d_p <= 128 else 2
    # the K scale of a key depends only on (key mod 8) div 2 inside each block: per_thread, per_warp (one per 128)
    group4_ok = config.qk_granularity in ("per_thread", "per_warp") and not config.smooth_q
    if group4 is None:
        group4 = group4_ok
    elif group4 and not group4_ok:
        raise ValueError(f"group4=True needs qk_granularity 'per_thread' or 'per_warp' without smooth_q, got "
                         f"{config.qk_granularity!r}, smooth_q={config.smooth_q}")
    extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
    k8, v_q = buffers["k8"], buffers["v16"] if fp16_v else buffers["v_t"]
    if v_q is None:
        raise ValueError(f"the buffers were quantized for another pv_dtype than {config.pv_dtype!r}")
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor.from_tensor(k8.view(-1, d_p), [config.block_n, d_p])
        if fp16_v:
            v_arg = TensorDescriptor.from_tensor(v_q.view(-1, d_p), [config.block_n, d_p])
        else:
            v_arg = TensorDescriptor.from_tensor(v_q.view(-1, lk_pad), [d_p, config.block_n])
    else:
        k_arg, v_arg = k8, v_q
    fuse_q = buffers["q8"] is None
    if fuse_q:   # Q is quantized inside the attention kernel
        q_src = buffers["q_src"]
        q_args = (q_src, buffers["k_scale"])
        q_strides = (q_src.stride(0), q_src.stride(1), q_src.stride(2), buffers["q_c"])
    else:
        q_args = (buffers["q8"], buffers["q_scale"])
        q_strides = (0, 0, 0, 1.0)
    (q_rule, q_group), _ = _RULES[config.qk_granularity]
    _attn_fwd_kernel[grid](
        *q_args, k_arg, buffers["k_scale"], v_arg, buffers["v_scale"],
        buffers["v_factor"] if buffers["v_factor"] is not None else buffers["v_scale"],
        buffers["v_mean"] if buffers["v_mean"] is not None else buffers["v_scale"],
        delta_s if delta_s is not None else buffers["k_scale"], out, lse2,
        lq, lk, lq_pad, lk_pad, hq, hk, d, lq_pad // Q_SMOOTH_BLOCK,
        out.stride(0), out.stride(1), out.stride(2), *q_strides,
        FUSE_Q=fuse_q, Q_RULE=q_rule, Q_GROUP=q_group, Q_FULL_D=d == d_p,
        USE_TMA=use_tma, V_BLOCK=buffers["v_factor"] is not None, IS_CAUSAL=is_causal, SMOOTH_Q=config.smooth_q, SMOOTH_V=config.smooth_v, ACCUM=accum,
        EXP2_FP16=config.exp2_fp16, EXP2_FTZ=exp2_ftz and not triton_interpreter_on(), EMULATE_FP8=triton_interpreter_on(), GROUP4=group4, I2F=i2f, V_FP16=fp16_v,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, D_P=d_p, Q_SMOOTH=Q_SMOOTH_BLOCK, num_warps=num_warps,
        num_stages=num_stages, **extra)
    return lse2


FUSE_Q = True   # quantize Q inside the attention kernel where it pays (see q_in_kernel)


def q_in_kernel(config: SageConfig, head_dim: int, fuse_q: bool | None = None) -> bool:
    """Whether the attention kernel quantizes Q itself: Q's scale groups must lie inside one query block
    (not ``per_block``'s 128 tokens), no Q mean is needed (no ``smooth_q``), and the padded head dim is 128.
    At 128 the kernel is capped at 168 registers anyway and the Q prologue fits under the cap; at 64 it
    raises the kernel from 128 to 168 registers (4 -> 3 programs per SM) and measured 5% slower on the H200
    (NOTES_sage.md v5), so there Q keeps its own quantizer. The FP16-PV kernel (no register cap, 2 programs
    per SM) measured 35-45% slower with the Q prologue, so it keeps the separate quantizer too."""
    fuse_q = FUSE_Q if fuse_q is None else fuse_q
    return (fuse_q and config.qk_granularity != "per_block" and not config.smooth_q
            and config.pv_dtype == "fp8" and padded_head_dim(head_dim) == 128)


def sage_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                          is_causal: bool, sm_scale: float, config: SageConfig, num_warps: int | None = None,
                          num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize and attend on [B, H, L, D] views; writes ``out`` (a [B, H, Lq, D] view, any strides).

    Returns (base-2 LSE of the smoothed scores [B, H, Lq], K mean [B*Hk, D_P] or None).
    """
    bsz, hq, lq, d = q.shape
    lk = k.shape[2]
    buffers = quantize_triton(q, k, v, sm_scale, config, quantize_q=not q_in_kernel(config, d))
    delta = None
    if config.smooth_q:
        delta = _delta_s(buffers["q_mean"], k, buffers["k_mean"], bsz, hq, buffers["k8"].shape[1])
    lse2 = attend_triton(buffers, out, lq, lk, is_causal=is_causal, config=config, delta_s=delta,
                         num_warps=num_warps, num_stages=num_stages)
    return lse2, buffers["k_mean"]


__all__ = ["TOKEN_TILE", "attend_triton", "key_slots", "padded_head_dim", "quantize_triton", "sage_attention_triton"]

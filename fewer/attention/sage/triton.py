"""Triton kernels of SageAttention2 (sm90 first; any GPU with FP8 tensor cores), and their launcher.

Three memory-bound kernels quantize, then one attention kernel runs (the arithmetic mirrors
``reference.py`` step by step):

- ``_kv_stats_kernel``: per 128-token chunk, K and V column sums (means) and V column max and min (V range);
- ``_quant_q_kernel``: Q * sm_scale * log2(e), optional Q smoothing (mean per 128 tokens), INT8 per group;
- ``_quant_kv_kernel``: K minus its mean -> INT8 per group; V (minus its mean) / per-channel scale -> FP8, written
  transposed ([D, L], the K-major layout the FP8 wgmma needs for its B operand);
- ``_attn_fwd_kernel``: INT8 QK^T (int32 accumulation), dequantize (exact int->float, one FMUL per score), online
  softmax in base 2, P~ * 448 -> FP8, FP8 PV into a FRESH accumulator per KV block added into FP32
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
from .reference import INT8_MAX, LOG2E, LOG2_P_SCALE, Q_SMOOTH_BLOCK, SCALE_FLOOR, fp32_scalar

# The kernels spell these constants as literals (Triton globals must be constexpr); keep them in step.
assert (INT8_MAX, SCALE_FLOOR) == (127.0, 1e-12) and abs(LOG2_P_SCALE - 8.807354922057604) < 1e-12

TOKEN_TILE = 128  # tokens per quantization program; every scale group and the Q-smoothing block fit in it

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
def _round_half_away(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int32).to(tl.int8)


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
def _kv_stats_kernel(k_ptr, v_ptr, ksum_ptr, vsum_ptr, vmax_ptr, vmin_ptr, L, D, HK,
                     s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                     TILE: tl.constexpr, D_P: tl.constexpr):
    """Per 128-token chunk: column sums of K and V, column max and min of V."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    rows = chunk * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, D_P)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    k = tl.load(k_ptr + b * s_kb + h * s_kh + rows[:, None] * s_kl + cols[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows[:, None] * s_vl + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    out = (bh * tl.num_programs(0) + chunk) * D_P + cols
    tl.store(ksum_ptr + out, tl.sum(k.to(tl.float32), axis=0))
    tl.store(vsum_ptr + out, tl.sum(v, axis=0))
    tl.store(vmax_ptr + out, tl.max(tl.where(mask, v, float("-inf")), axis=0))
    tl.store(vmin_ptr + out, tl.min(tl.where(mask, v, float("inf")), axis=0))


@triton.jit
def _quant_q_kernel(q_ptr, q8_ptr, qs_ptr, qmean_ptr, L, D, H, L_PAD, N_SMOOTH, c,
                    s_qb, s_qh, s_ql,
                    RULE: tl.constexpr, GROUP: tl.constexpr, SMOOTH: tl.constexpr,
                    TILE: tl.constexpr, D_P: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tile * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, D_P)
    valid = rows < L
    mask = valid[:, None] & (cols[None, :] < D)
    x = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) * c
    if SMOOTH:  # TILE == Q_SMOOTH_BLOCK: one mean per program
        count = tl.minimum(L - tile * TILE, TILE).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        tl.store(qmean_ptr + (bh * N_SMOOTH + tile) * D_P + cols, mean)
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = _group_amax(tl.max(tl.abs(x), axis=1), RULE, GROUP, TILE)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    q8 = _round_half_away(tl.math.div_rn(x, scale[:, None]))
    tl.store(q8_ptr + (bh * L_PAD + rows[:, None]) * D_P + cols[None, :], q8)
    tl.store(qs_ptr + bh * L_PAD + rows, scale)


@triton.jit
def _quant_kv_kernel(k_ptr, v_ptr, kmean_ptr, vmean_ptr, vscale_ptr, k8_ptr, ks_ptr, vt_ptr, L, D, HK, L_PAD,
                     s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                     RULE: tl.constexpr, GROUP: tl.constexpr, SMOOTH: tl.constexpr, SMOOTH_V: tl.constexpr,
                     EMULATE_FP8: tl.constexpr, TILE: tl.constexpr, D_P: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    rows = tile * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, D_P)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    k = tl.load(k_ptr + b * s_kb + h * s_kh + rows[:, None] * s_kl + cols[None, :], mask=mask, other=0.0)
    k = k.to(tl.float32)
    if SMOOTH:
        k = tl.where(mask, k - tl.load(kmean_ptr + bh * D_P + cols)[None, :], 0.0)
    amax = _group_amax(tl.max(tl.abs(k), axis=1), RULE, GROUP, TILE)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    k8 = _round_half_away(tl.math.div_rn(k, scale[:, None]))
    tl.store(k8_ptr + (bh * L_PAD + rows[:, None]) * D_P + cols[None, :], k8)
    tl.store(ks_ptr + bh * L_PAD + rows, scale)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + rows[:, None] * s_vl + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if SMOOTH_V:
        v = tl.where(mask, v - tl.load(vmean_ptr + bh * D_P + cols)[None, :], 0.0)
    v_scale = tl.load(vscale_ptr + bh * D_P + cols)
    v8 = _to_e4m3(tl.math.div_rn(v, v_scale[None, :]), EMULATE_FP8)
    tl.store(vt_ptr + (bh * D_P + cols[None, :]) * L_PAD + rows[:, None], v8)   # transposed: [D, L]


@triton.jit
def _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, ds_base, start_n, rows, L_K, L_PAD,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr, ACCUM: tl.constexpr,
                EXP2_FP16: tl.constexpr, EXP2_FTZ: tl.constexpr, EMULATE_FP8: tl.constexpr,
                BLOCK_N: tl.constexpr, D_P: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_P)
    k = tl.load(k_base + cols[:, None] * D_P + dims[None, :])
    ks = tl.load(ks_base + cols)
    s_int = tl.dot(q, tl.trans(k))
    # int32 -> float32 without I2F (a quarter-rate conversion on sm90): |s_int| < 127*127*256 < 2^22, so
    # adding 1.5*2^23's bit pattern and subtracting 1.5*2^23 as a float is exact, on full-rate ALUs
    t = ((s_int + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * ks[None, :]
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
    shift = m_safe - 8.807354922057604          # log2(448): P~ comes out scaled to [0, 448]
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
    if EXP2_FP16 and not EMULATE_FP8:
        p8 = p.to(tl.float8e4nv)
    else:
        p8 = _to_e4m3(p.to(tl.float32), EMULATE_FP8)
    vt = tl.load(vt_base + dims[:, None] * L_PAD + cols[None, :])          # [D_P, BLOCK_N], keys contiguous
    if ACCUM == 0:    # two-level: fresh FP32 accumulator per KV block
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
    elif ACCUM == 1:  # single running accumulator (the ablation)
        acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
    else:             # SageAttention2++: FP16 accumulator per KV block
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt), out_dtype=tl.float16).to(tl.float32)
    return acc, l_i, m_safe


@triton.jit
def _attn_fwd_kernel(q8_ptr, qs_ptr, k8_ptr, ks_ptr, vt_ptr, vs_ptr, vm_ptr, ds_ptr, o_ptr, lse_ptr,
                     L_Q, L_K, LQ_PAD, LK_PAD, H, HK, D, N_SMOOTH,
                     s_ob, s_oh, s_ol,
                     IS_CAUSAL: tl.constexpr, SMOOTH_Q: tl.constexpr, SMOOTH_V: tl.constexpr, ACCUM: tl.constexpr,
                     EXP2_FP16: tl.constexpr, EXP2_FTZ: tl.constexpr, EMULATE_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D_P: tl.constexpr, Q_SMOOTH: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // (H // HK)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_P)
    q = tl.load(q8_ptr + (bh * LQ_PAD + rows[:, None]) * D_P + dims[None, :])
    qs = tl.load(qs_ptr + bh * LQ_PAD + rows)
    k_base = k8_ptr + bhk * LK_PAD * D_P
    ks_base = ks_ptr + bhk * LK_PAD
    vt_base = vt_ptr + bhk * D_P * LK_PAD
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
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, ds_base, start_n, rows,
                                    L_K, LK_PAD, False, IS_CAUSAL, SMOOTH_Q, ACCUM, EXP2_FP16, EXP2_FTZ,
                                    EMULATE_FP8, BLOCK_N, D_P)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, ds_base, start_n, rows,
                                    L_K, LK_PAD, True, IS_CAUSAL, SMOOTH_Q, ACCUM, EXP2_FP16, EXP2_FTZ,
                                    EMULATE_FP8, BLOCK_N, D_P)
    inv_l = 1.0 / l_i
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


def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 32): tl.dot tiles need power-of-two sizes and INT8 MMAs a K of 32."""
    return max(32, 1 << (d - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, config: SageConfig,
                    *, k_mean: torch.Tensor | None = None, v_mean: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor | None]:
    """Run the three quantization kernels on [B, H, L, D] views. Returns padded buffers (see module doc).

    ``k_mean``/``v_mean`` ([B, Hk, 1, D]) override the computed means (tests use them to compare with the
    twin bit for bit; the kernels sum in another order than torch.mean).
    """
    _patch_interpreter_scalar_index()
    bsz, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    d_p = padded_head_dim(d)
    lq_pad, lk_pad = _round_up(lq, TOKEN_TILE), _round_up(lk, TOKEN_TILE)
    dev = q.device
    emulate = triton_interpreter_on()
    (q_rule, q_group), (k_rule, k_group) = _RULES[config.qk_granularity]
    n_chunks = lk_pad // TOKEN_TILE
    ksum = torch.empty(bsz * hk, n_chunks, d_p, device=dev, dtype=torch.float32)
    vsum, vmax, vmin = torch.empty_like(ksum), torch.empty_like(ksum), torch.empty_like(ksum)
    _kv_stats_kernel[(n_chunks, bsz * hk)](k, v, ksum, vsum, vmax, vmin, lk, d, hk, k.stride(0), k.stride(1), k.stride(2),
                                           v.stride(0), v.stride(1), v.stride(2), TILE=TOKEN_TILE, D_P=d_p)
    if config.smooth_k and k_mean is None:
        k_mean = ksum.sum(dim=1) / lk                                    # [B*Hk, D_P]
    elif k_mean is not None:
        k_mean = torch.nn.functional.pad(k_mean.reshape(bsz * hk, d).float(), (0, d_p - d))
    if config.smooth_v and v_mean is None:
        v_mean = vsum.sum(dim=1) / lk                                    # [B*Hk, D_P]
    elif v_mean is not None:
        v_mean = torch.nn.functional.pad(v_mean.reshape(bsz * hk, d).float(), (0, d_p - d))
    # max |V - mean| per channel from the column max and min (float rounding is monotonic, so this equals
    # the twin's max over tokens bit for bit)
    v_hi, v_lo = vmax.amax(dim=1), vmin.amin(dim=1)
    centre = v_mean if v_mean is not None else torch.zeros_like(v_hi)
    v_absmax = torch.maximum(v_hi - centre, centre - v_lo)
    v_scale = v_absmax.clamp_min(SCALE_FLOOR) / fp32_scalar(config.resolved_v_scale_max)
    n_smooth = lq_pad // Q_SMOOTH_BLOCK
    q8 = torch.empty(bsz * hq, lq_pad, d_p, device=dev, dtype=torch.int8)
    q_scale = torch.empty(bsz * hq, lq_pad, device=dev, dtype=torch.float32)
    q_mean = torch.empty(bsz * hq, n_smooth, d_p, device=dev, dtype=torch.float32) if config.smooth_q else None
    _quant_q_kernel[(lq_pad // TOKEN_TILE, bsz * hq)](
        q, q8, q_scale, q_mean if q_mean is not None else q_scale, lq, d, hq, lq_pad, n_smooth,
        sm_scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
        RULE=q_rule, GROUP=q_group, SMOOTH=config.smooth_q, TILE=TOKEN_TILE, D_P=d_p)
    k8 = torch.empty(bsz * hk, lk_pad, d_p, device=dev, dtype=torch.int8)
    k_scale = torch.empty(bsz * hk, lk_pad, device=dev, dtype=torch.float32)
    v_t = torch.empty(bsz * hk, d_p, lk_pad, device=dev, dtype=torch.float8_e4m3fn)
    _quant_kv_kernel[(lk_pad // TOKEN_TILE, bsz * hk)](
        k, v, k_mean if k_mean is not None else v_scale, v_mean if v_mean is not None else v_scale, v_scale,
        k8, k_scale, v_t, lk, d, hk, lk_pad,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        RULE=k_rule, GROUP=k_group, SMOOTH=config.smooth_k, SMOOTH_V=config.smooth_v, EMULATE_FP8=emulate,
        TILE=TOKEN_TILE, D_P=d_p)
    return dict(q8=q8, q_scale=q_scale, q_mean=q_mean, k8=k8, k_scale=k_scale, v_t=v_t, v_scale=v_scale,
                k_mean=k_mean if config.smooth_k else None, v_mean=v_mean if config.smooth_v else None)


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
                  num_warps: int | None = None, num_stages: int | None = None, exp2_ftz: bool = True
                  ) -> torch.Tensor:
    """Launch the attention kernel on quantized buffers; writes ``out`` [B, H, Lq, D] (a view, any strides).

    ``exp2_ftz=False`` keeps Triton's own exp2 (for benchmarking the difference); the interpreter always uses it.

    Returns the base-2 LSE of the smoothed scores, [B, H, Lq] float32.
    """
    bsz, hq, d = out.shape[0], out.shape[1], out.shape[3]
    hk = buffers["k8"].shape[0] // bsz
    lq_pad, lk_pad, d_p = buffers["q8"].shape[1], buffers["k8"].shape[1], buffers["q8"].shape[2]
    lse2 = torch.empty(bsz, hq, lq, device=out.device, dtype=torch.float32)
    accum = {"fp32+fp32": 0, "fp32": 1, "fp32+fp16": 2}[config.pv_accumulation]
    grid = (triton.cdiv(lq, config.block_m), bsz * hq)
    if num_warps is None:
        num_warps = 4 if config.block_m <= 64 else 8
    if num_stages is None:
        num_stages = 3 if d_p <= 128 else 2
    _attn_fwd_kernel[grid](
        buffers["q8"], buffers["q_scale"], buffers["k8"], buffers["k_scale"], buffers["v_t"], buffers["v_scale"],
        buffers["v_mean"] if buffers["v_mean"] is not None else buffers["v_scale"],
        delta_s if delta_s is not None else buffers["q_scale"], out, lse2,
        lq, lk, lq_pad, lk_pad, hq, hk, d, lq_pad // Q_SMOOTH_BLOCK,
        out.stride(0), out.stride(1), out.stride(2),
        IS_CAUSAL=is_causal, SMOOTH_Q=config.smooth_q, SMOOTH_V=config.smooth_v, ACCUM=accum,
        EXP2_FP16=config.exp2_fp16, EXP2_FTZ=exp2_ftz and not triton_interpreter_on(), EMULATE_FP8=triton_interpreter_on(), BLOCK_M=config.block_m, BLOCK_N=config.block_n, D_P=d_p,
        Q_SMOOTH=Q_SMOOTH_BLOCK, num_warps=num_warps, num_stages=num_stages)
    return lse2


def sage_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                          is_causal: bool, sm_scale: float, config: SageConfig, num_warps: int | None = None,
                          num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize and attend on [B, H, L, D] views; writes ``out`` (a [B, H, Lq, D] view, any strides).

    Returns (base-2 LSE of the smoothed scores [B, H, Lq], K mean [B*Hk, D_P] or None).
    """
    bsz, hq, lq, d = q.shape
    lk = k.shape[2]
    buffers = quantize_triton(q, k, v, sm_scale, config)
    delta = None
    if config.smooth_q:
        delta = _delta_s(buffers["q_mean"], k, buffers["k_mean"], bsz, hq, buffers["k8"].shape[1])
    lse2 = attend_triton(buffers, out, lq, lk, is_causal=is_causal, config=config, delta_s=delta,
                         num_warps=num_warps, num_stages=num_stages)
    return lse2, buffers["k_mean"]


__all__ = ["TOKEN_TILE", "attend_triton", "padded_head_dim", "quantize_triton", "sage_attention_triton"]

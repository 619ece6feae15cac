"""Triton kernel: attention output O and its tangent tO in one pass (FlashAttention-style).

One program owns BLOCK_M query rows of one (batch, head) and streams the key/value blocks once.
Per key block it forms S = Q K^T and tS = tQ K^T + Q tK^T (three products), P~ = exp2(S - m) with
the running max m, and updates, all rescaled by alpha = exp2(m_old - m_new) when m moves (lazily:
only when some row's max grows by more than a slack, see ``rescale_slack_for``):

    l  = sum P~                         (normalizer)
    r  = sum P~ * tS                    (so mu = r / l = rowsum(P * tS), the log-normalizer's tangent)
    Ao = P~ V                           (output)
    At = P~ tV + (P~ * (tS - c)) V      (tangent), c = r / l so far, re-centred when c moves

(three more products). The epilogue writes O = Ao / l, tO = At / l and the natural-log LSE. Six
products against the forward's two: 3x the forward FLOPs, one pass over K/V, no L x L matrix.

Centring on the running mu (instead of accumulating (P~ * tS) V and subtracting mu O at the end,
as the rCM kernel does) keeps the 16-bit operand P~ * (tS - c) small where attention is peaked,
which removes a cancellation that tripled the bf16 error of tO on peaked inputs.
``reference.jvp_attention_blockwise`` is the PyTorch twin with the same arithmetic.

Sequence lengths and head dims are runtime arguments (no recompiles per length); head dims are
padded to a power of two by masked loads. Imported only when the Triton path runs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...core.capability import triton_interpreter_on
from .reference import rescale_slack_for


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b with float32 accumulation. The interpreter stores bf16 as uint16 and would multiply
    the bit patterns, so there the (already rounded) operands are widened first: same products."""
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _round_to(x, dtype, MANUAL_BF16: tl.constexpr):
    """x rounded to ``dtype`` (nearest even). The interpreter truncates float32 -> bf16, so there the
    rounding is done on the bits and the result stays float32 (exactly a bf16 value)."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attend_key_block(start_n, q, tq, k_base, tk_base, v_base, tv_base,
                      stride_kl, stride_tkl, stride_vl, stride_tvl,
                      offs_m, offs_n, dk_ok, dv_ok, len_k, scale, m_i, l_i, r_i, c_i, acc_o, acc_t,
                      MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, WITH_TANGENT: tl.constexpr,
                      RESCALE_SLACK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      INTERPRETER: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """One key block: three products for S and tS, then the softmax update, then three for O and tO.

    ``MASKED`` blocks (the last, partial key block and causal diagonal blocks) mask columns; interior
    blocks skip the compare-and-select. The score products are issued before the softmax needs S,
    so on Hopper the two tangent products can run on the tensor cores while the softmax runs.
    """
    cols = start_n + offs_n
    if MASKED:
        col_ok = cols < len_k
        kt_mask = dk_ok[:, None] & col_ok[None, :]
        v_mask = col_ok[:, None] & dv_ok[None, :]
    else:
        kt_mask = dk_ok[:, None]
        v_mask = dv_ok[None, :]
    k_t = tl.load(k_base + cols[None, :] * stride_kl, mask=kt_mask, other=0.0)
    zeros = tl.zeros([q.shape[0], k_t.shape[1]], dtype=tl.float32)
    scores = _dot(q, k_t, zeros, DOT_PRECISION, INTERPRETER)        # raw Q K^T, unscaled
    if WITH_TANGENT:
        tk_t = tl.load(tk_base + cols[None, :] * stride_tkl, mask=kt_mask, other=0.0)
        t_raw = _dot(tq, k_t, zeros, DOT_PRECISION, INTERPRETER)
        t_raw = _dot(q, tk_t, t_raw, DOT_PRECISION, INTERPRETER)      # tS / scale
    if MASKED:
        valid = col_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        scores = tl.where(valid, scores, float("-inf"))
    qk_scale = scale * 1.4426950408889634                             # base-2 exponent per raw score
    m_blk = tl.max(scores, 1) * qk_scale
    # Lazy rescaling (as FlashAttention-4 does): the running max m moves only when some row's block max
    # exceeds it by more than RESCALE_SLACK (log2 units). Exact: any shift m cancels in O = Ao / l and
    # tO = At / l; the slack only bounds P~ by 2^RESCALE_SLACK. Most blocks then skip rescaling the two
    # [BLOCK_M, D] accumulators, ~6 of ~20 non-matrix operations per score at BLOCK_N 64, d 128.
    if tl.max(m_blk - m_i, 0) > RESCALE_SLACK:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_o = acc_o * alpha[:, None]
        if WITH_TANGENT:
            r_i = r_i * alpha
            acc_t = acc_t * alpha[:, None]
        m_i = m_new
    p = tl.exp2(scores * qk_scale - m_i[:, None])                     # one FFMA + exp2 per score
    l_i = l_i + tl.sum(p, 1)
    v_blk = tl.load(v_base + cols[:, None] * stride_vl, mask=v_mask, other=0.0)
    p_op = _round_to(p, v_blk.dtype, MANUAL_BF16)
    if WITH_TANGENT:
        r_i = r_i + tl.sum(p * t_raw, 1) * scale
        c_new = r_i / l_i                                               # running estimate of mu
        acc_t = acc_t + (c_i - c_new)[:, None] * acc_o                  # re-centre on the new estimate
        centred = _round_to(p * (t_raw * scale - c_new[:, None]), v_blk.dtype, MANUAL_BF16)
        tv_blk = tl.load(tv_base + cols[:, None] * stride_tvl, mask=v_mask, other=0.0)
        acc_t = _dot(p_op, tv_blk, acc_t, DOT_PRECISION, INTERPRETER)
        acc_t = _dot(centred, v_blk, acc_t, DOT_PRECISION, INTERPRETER)
        c_i = c_new
    acc_o = _dot(p_op, v_blk, acc_o, DOT_PRECISION, INTERPRETER)
    return m_i, l_i, r_i, c_i, acc_o, acc_t


@triton.jit
def _jvp_attention_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_tqb, stride_tqh, stride_tql, stride_tkb, stride_tkh, stride_tkl, stride_tvb, stride_tvh, stride_tvl,
    stride_ob, stride_oh, stride_ol, stride_tob, stride_toh, stride_tol,
    num_heads, len_q, len_k, head_dim_qk, head_dim_v, scale, len_bucket,
    IS_CAUSAL: tl.constexpr, WITH_TANGENT: tl.constexpr, RESCALE_SLACK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, MANUAL_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit (batch, head) offsets: B*H*L*D can pass 2^31 elements (e.g. batched Wan2.1-14B shapes)
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q
    dk_ok = offs_dk < head_dim_qk
    dv_ok = offs_dv < head_dim_v

    q_mask = row_ok[:, None] & dk_ok[None, :]
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_ql + offs_dk[None, :],
                mask=q_mask, other=0.0)
    k_base = K + batch * stride_kb + head * stride_kh + offs_dk[:, None]     # K^T tile: [DQK, N]
    v_base = V + batch * stride_vb + head * stride_vh + offs_dv[None, :]     # V tile: [N, DV]
    tq = q                                                                   # placeholder
    tk_base = k_base
    tv_base = v_base
    if WITH_TANGENT:
        tq = tl.load(TQ + batch * stride_tqb + head * stride_tqh + offs_m[:, None] * stride_tql + offs_dk[None, :],
                     mask=q_mask, other=0.0)
        tk_base = TK + batch * stride_tkb + head * stride_tkh + offs_dk[:, None]
        tv_base = TV + batch * stride_tvb + head * stride_tvh + offs_dv[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)                             # these three: tangent only
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key blocks [0, full_stop) need no column mask; [full_stop, hi) are the partial last block and,
    # causal (top-left aligned: row i sees keys j <= i), the blocks that cross this tile's diagonal.
    hi = len_k
    full_stop = (len_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        row_start = pid_m * BLOCK_M
        hi = tl.minimum(len_k, row_start + BLOCK_M)
        full_stop = tl.minimum(full_stop, ((row_start + 1) // BLOCK_N) * BLOCK_N)
    if INTERPRETER:
        # The interpreter (numpy >= 2.4) cannot pass a runtime int to range(); a while loop
        # works there. Compiled code keeps the for loops, which Triton software-pipelines.
        # (MASKED is a plain bool here: the interpreter takes it at run time)
        start_n = 0
        while start_n < hi:
            m_i, l_i, r_i, c_i, acc_o, acc_t = _attend_key_block(
                start_n, q, tq, k_base, tk_base, v_base, tv_base, stride_kl, stride_tkl, stride_vl, stride_tvl,
                offs_m, offs_n, dk_ok, dv_ok, len_k, scale, m_i, l_i, r_i, c_i, acc_o, acc_t,
                start_n >= full_stop, IS_CAUSAL, WITH_TANGENT, RESCALE_SLACK, DOT_PRECISION, INTERPRETER, MANUAL_BF16)
            start_n += BLOCK_N
    else:
        for start_n in range(0, full_stop, BLOCK_N):
            m_i, l_i, r_i, c_i, acc_o, acc_t = _attend_key_block(
                start_n, q, tq, k_base, tk_base, v_base, tv_base, stride_kl, stride_tkl, stride_vl, stride_tvl,
                offs_m, offs_n, dk_ok, dv_ok, len_k, scale, m_i, l_i, r_i, c_i, acc_o, acc_t,
                False, IS_CAUSAL, WITH_TANGENT, RESCALE_SLACK, DOT_PRECISION, INTERPRETER, MANUAL_BF16)
        for start_n in range(full_stop, hi, BLOCK_N):
            m_i, l_i, r_i, c_i, acc_o, acc_t = _attend_key_block(
                start_n, q, tq, k_base, tk_base, v_base, tv_base, stride_kl, stride_tkl, stride_vl, stride_tvl,
                offs_m, offs_n, dk_ok, dv_ok, len_k, scale, m_i, l_i, r_i, c_i, acc_o, acc_t,
                True, IS_CAUSAL, WITH_TANGENT, RESCALE_SLACK, DOT_PRECISION, INTERPRETER, MANUAL_BF16)

    inv_l = 1.0 / l_i
    out = acc_o * inv_l[:, None]
    o_mask = row_ok[:, None] & dv_ok[None, :]
    tl.store(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ol + offs_dv[None, :],
             _round_to(out, O.dtype.element_ty, MANUAL_BF16).to(O.dtype.element_ty), mask=o_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453                      # back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * len_q + offs_m, lse, mask=row_ok)
    if WITH_TANGENT:
        t_out = acc_t * inv_l[:, None]                                      # centred on c = mu: no - mu O
        tl.store(TO + batch * stride_tob + head * stride_toh + offs_m[:, None] * stride_tol + offs_dv[None, :],
                 _round_to(t_out, TO.dtype.element_ty, MANUAL_BF16).to(TO.dtype.element_ty), mask=o_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on CUDA; the interpreter takes one small tile.
_CUDA_CONFIGS = [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 4),
    (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 4), (64, 128, 8, 2),
]
_INTERPRETER_TILE = (16, 16)


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _CUDA_CONFIGS]
    # Sequence lengths are runtime arguments, so a new length never recompiles; tuning is keyed on a
    # coarse length bucket (the kernel ignores ``len_bucket``), so it re-tunes only per bucket.
    return triton.autotune(configs=configs,
                           key=["BLOCK_DQK", "BLOCK_DV", "IS_CAUSAL", "WITH_TANGENT", "RESCALE_SLACK", "len_bucket"])(
        _jvp_attention_fwd_kernel)


def _length_bucket(len_q: int, len_k: int) -> int:
    return min(16384, triton.next_power_of_2(max(1024, min(len_q, len_k))))


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


ALWAYS_RESCALE = -1.0e30   # a slack every block exceeds: the classic rescale-every-block schedule


def jvp_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None,
                          is_causal: bool, scale: float, *, block: tuple[int, int] | None = None,
                          rescale_slack: float | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the kernel on [B, H, L, D] tensors (inner stride 1). Returns (O, tO or None, LSE [B, H, Lq]).

    Without tangents (all three None) only O and LSE are computed (2 products per block instead of 6).
    Inputs are validated by ``ops``; this function trusts them. ``block`` pins (BLOCK_M, BLOCK_N);
    ``rescale_slack`` overrides ``rescale_slack_for(dtype)`` (``ALWAYS_RESCALE``: the ablation).
    """
    with_tangent = tq is not None
    batch, heads, len_q, d_qk = q.shape
    len_k, d_v = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, len_q, d_v), dtype=q.dtype, device=q.device)
    t_out = torch.empty_like(out) if with_tangent else out
    lse = torch.empty((batch, heads, len_q), dtype=torch.float32, device=q.device)
    if not with_tangent:  # placeholders the kernel never reads
        tq, tk, tv = q, k, v
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    args = (q, k, v, tq, tk, tv, out, t_out, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *tq.stride()[:3], *tk.stride()[:3], *tv.stride()[:3],
            *out.stride()[:3], *t_out.stride()[:3],
            heads, len_q, len_k, d_qk, d_v, float(scale), _length_bucket(len_q, len_k))
    slack = rescale_slack_for(q.dtype) if rescale_slack is None else float(rescale_slack)
    meta = dict(IS_CAUSAL=bool(is_causal), WITH_TANGENT=with_tangent, RESCALE_SLACK=slack,
                DOT_PRECISION=precision,
                INTERPRETER=triton_interpreter_on(),
                MANUAL_BF16=triton_interpreter_on() and q.dtype == torch.bfloat16,
                BLOCK_DQK=padded_head_dim(d_qk), BLOCK_DV=padded_head_dim(d_v))
    if block is None and triton_interpreter_on():
        block = _INTERPRETER_TILE
    if block is not None:
        block_m, block_n = block
        grid = (triton.cdiv(len_q, block_m), batch * heads)
        _jvp_attention_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        grid = lambda cfg: (triton.cdiv(len_q, cfg["BLOCK_M"]), batch * heads)  # noqa: E731
        _autotuned_kernel()[grid](*args, **meta)
    return out, (t_out if with_tangent else None), lse

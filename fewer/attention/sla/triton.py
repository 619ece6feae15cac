"""Fused Triton kernels of Sparse-Linear Attention: one forward kernel, one backward kernel.

Both kernels do the sparse (softmax) and the linear part together, as the paper does. The linear
part over the marginal blocks of query block i is computed without any D x D state per block:

    H_i = sum_{j marginal} phi(K_j)^T V_j   =>   phi(Q_i) H_i = sum_j (phi(Q_i) phi(K_j)^T) V_j

so each visited key block costs two small matmuls that reuse the K/V tiles already loaded for the
softmax part. Three linear modes (constexpr LINEAR_MODE):

- 0: no linear work in the kernel (linear_scope="all", computed in PyTorch, or no marginal block);
- 1: "subtract" (the paper's pre-aggregation): start from totals over all keys (H_tot, Z_tot, from
     PyTorch) and subtract the critical blocks (already loaded) and the negligible blocks;
- 2: "direct": sum the marginal blocks (used when they are fewer than the blocks to subtract).

Layout: q, qphi [BH, Lq, D]; k, v, kphi [BH, Lk, D] (contiguous); lse is in the log2 domain.
Triton is imported lazily by the launchers' callers (ops.py); importing this module needs Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...core import triton_interpreter_on

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with fp32 accumulation. The interpreter keeps bf16 as raw uint16 bits and would multiply
    those, so there the (already rounded) operands are widened first: the same products."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_critical_step(j, q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_n, offs_d, mask_d,
                       Lk, D, qk_scale, BLOCK_N: tl.constexpr, LINEAR_MODE: tl.constexpr, PREC: tl.constexpr,
                       INTERPRET: tl.constexpr):
    offs_k = j * BLOCK_N + offs_n
    mask_k = offs_k < Lk
    kv_off = k_base + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = mask_k[:, None] & mask_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), PREC, INTERPRET) * qk_scale
    s = tl.where(mask_k[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, INTERPRET)
    if LINEAR_MODE == 1:
        # the critical block leaves the linear sum: subtract its (phi(Q) phi(K)^T) V, reusing V
        kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
        w = _dot(qphi, tl.trans(kphi), PREC, INTERPRET)
        acc_l += _dot(w.to(v.dtype), v, PREC, INTERPRET)
        den_l += tl.sum(w, 1)
    return m_new, l_i, acc, acc_l, den_l


@triton.jit
def _fwd_linear_step(j, qphi, acc_l, den_l, V, KPHI, k_base, offs_n, offs_d, mask_d, Lk, D,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    offs_k = j * BLOCK_N + offs_n
    kv_off = k_base + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = (offs_k < Lk)[:, None] & mask_d[None, :]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
    w = _dot(qphi, tl.trans(kphi), PREC, INTERPRET)
    acc_l += _dot(w.to(v.dtype), v, PREC, INTERPRET)
    den_l += tl.sum(w, 1)
    return acc_l, den_l


@triton.jit
def _sla_fwd_kernel(Q, K, V, QPHI, KPHI, HTOT, ZTOT, LUT_C, LUT_L, OS, LSE, OL, DEN,
                    Lq, Lk, D, Mq, NC, NL, qk_scale, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    LINEAR_MODE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    q_off = bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    k_base = bh * Lk * D
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_l = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    den_l = tl.zeros([BLOCK_M], tl.float32)
    if LINEAR_MODE != 0:
        qphi = tl.load(QPHI + q_off, mask=q_mask, other=0.0)
    else:
        qphi = q

    lut_c = LUT_C + (bh * Mq + pid_m) * NC
    lut_l = LUT_L + (bh * Mq + pid_m) * NL
    if INTERPRET:
        # the interpreter (numpy >= 2.4) cannot take a runtime bound in range(); compiled code
        # keeps the for loops, which Triton software-pipelines
        t = 0
        while t < NC:
            m_i, l_i, acc, acc_l, den_l = _fwd_critical_step(
                tl.load(lut_c + t), q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_n, offs_d,
                mask_d, Lk, D, qk_scale, BLOCK_N, LINEAR_MODE, PREC, INTERPRET)
            t += 1
        if LINEAR_MODE != 0:
            t = 0
            while t < NL:
                acc_l, den_l = _fwd_linear_step(tl.load(lut_l + t), qphi, acc_l, den_l, V, KPHI, k_base, offs_n,
                                                offs_d, mask_d, Lk, D, BLOCK_N, PREC, INTERPRET)
                t += 1
    else:
        for t in range(NC):
            m_i, l_i, acc, acc_l, den_l = _fwd_critical_step(
                tl.load(lut_c + t), q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_n, offs_d,
                mask_d, Lk, D, qk_scale, BLOCK_N, LINEAR_MODE, PREC, INTERPRET)
        if LINEAR_MODE != 0:
            for t in range(NL):
                acc_l, den_l = _fwd_linear_step(tl.load(lut_l + t), qphi, acc_l, den_l, V, KPHI, k_base, offs_n,
                                                offs_d, mask_d, Lk, D, BLOCK_N, PREC, INTERPRET)

    out = acc / l_i[:, None]
    tl.store(OS + q_off, out.to(OS.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)

    if LINEAR_MODE != 0:
        if LINEAR_MODE == 1:
            h_off = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
            htot = tl.load(HTOT + h_off, mask=mask_d[:, None] & mask_d[None, :], other=0.0)
            ztot = tl.load(ZTOT + bh * D + offs_d, mask=mask_d, other=0.0)
            qphi_f = qphi.to(tl.float32)
            num = _dot(qphi_f, htot, PREC, INTERPRET) - acc_l
            den = tl.sum(qphi_f * ztot[None, :], 1) - den_l
        else:
            num = acc_l
            den = den_l
        den = den + eps
        tl.store(OL + q_off, num / den[:, None], mask=q_mask)
        tl.store(DEN + bh * Lq + offs_m, den, mask=mask_m)


@triton.jit
def _dq_step(j, q, do, lse, delta, qphi, dn, ddn, dq, dqphi, K, V, KPHI, k_base, offs_n, offs_d, mask_d, Lk, D,
             qk_scale, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, LINEAR: tl.constexpr, PREC: tl.constexpr,
             INTERPRET: tl.constexpr):
    offs_k = j * BLOCK_N + offs_n
    mask_k = offs_k < Lk
    kv_off = k_base + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = mask_k[:, None] & mask_d[None, :]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if SPARSE:
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PREC, INTERPRET) * qk_scale
        p = tl.where(mask_k[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, INTERPRET)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, INTERPRET)
    if LINEAR:
        kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
        dw = _dot(dn, tl.trans(v), PREC, INTERPRET) + ddn[:, None]
        dqphi += _dot(dw.to(kphi.dtype), kphi, PREC, INTERPRET)
    return dq, dqphi


@triton.jit
def _sla_bwd_dq(pid_m, bh, Q, K, V, QPHI, KPHI, DOS, LSE, DELTA, DN, DDN, LUT_C, LUT_L, DQ, DQPHI,
                Lq, Lk, D, Mq, NC, NL, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                LINEAR_MODE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    q_off = bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    k_base = bh * Lk * D
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DOS + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqphi = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if LINEAR_MODE != 0:
        qphi = tl.load(QPHI + q_off, mask=q_mask, other=0.0)
        dn = tl.load(DN + q_off, mask=q_mask, other=0.0)
        ddn = tl.load(DDN + bh * Lq + offs_m, mask=mask_m, other=0.0)
    else:
        qphi = q
        dn = do
        ddn = delta

    lut_c = LUT_C + (bh * Mq + pid_m) * NC
    lut_l = LUT_L + (bh * Mq + pid_m) * NL
    if INTERPRET:
        t = 0
        while t < NC:
            dq, dqphi = _dq_step(tl.load(lut_c + t), q, do, lse, delta, qphi, dn, ddn, dq, dqphi, K, V, KPHI, k_base,
                                 offs_n, offs_d, mask_d, Lk, D, qk_scale, BLOCK_N, True, LINEAR_MODE == 1, PREC, INTERPRET)
            t += 1
        if LINEAR_MODE != 0:
            t = 0
            while t < NL:
                dq, dqphi = _dq_step(tl.load(lut_l + t), q, do, lse, delta, qphi, dn, ddn, dq, dqphi, K, V, KPHI,
                                     k_base, offs_n, offs_d, mask_d, Lk, D, qk_scale, BLOCK_N, False, True, PREC, INTERPRET)
                t += 1
    else:
        for t in range(NC):
            dq, dqphi = _dq_step(tl.load(lut_c + t), q, do, lse, delta, qphi, dn, ddn, dq, dqphi, K, V, KPHI, k_base,
                                 offs_n, offs_d, mask_d, Lk, D, qk_scale, BLOCK_N, True, LINEAR_MODE == 1, PREC, INTERPRET)
        if LINEAR_MODE != 0:
            for t in range(NL):
                dq, dqphi = _dq_step(tl.load(lut_l + t), q, do, lse, delta, qphi, dn, ddn, dq, dqphi, K, V, KPHI,
                                     k_base, offs_n, offs_d, mask_d, Lk, D, qk_scale, BLOCK_N, False, True, PREC, INTERPRET)

    if LINEAR_MODE != 0:
        if LINEAR_MODE == 1:
            dqphi = -dqphi
        tl.store(DQPHI + q_off, dqphi, mask=q_mask)
    tl.store(DQ + q_off, dq * sm_scale, mask=q_mask)


@triton.jit
def _dkdv_step(i, k, v, kphi, dk, dv, dv_l, dkphi, Q, QPHI, DOS, LSE, DELTA, DN, DDN, q_base, offs_mb, offs_d,
               mask_n, mask_d, Lq, D, qk_scale, BLOCK_M: tl.constexpr, SPARSE: tl.constexpr,
               LINEAR: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    offs_m = i * BLOCK_M + offs_mb
    mask_m = offs_m < Lq
    q_off = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    row = q_base // D + offs_m
    if SPARSE:
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DOS + q_off, mask=q_mask, other=0.0)
        lse = tl.load(LSE + row, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
        st = _dot(k, tl.trans(q), PREC, INTERPRET) * qk_scale
        pt = tl.where(mask_n[:, None] & mask_m[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, PREC, INTERPRET)
        dpt = _dot(v, tl.trans(do), PREC, INTERPRET)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC, INTERPRET)
    if LINEAR:
        qphi = tl.load(QPHI + q_off, mask=q_mask, other=0.0)
        dn = tl.load(DN + q_off, mask=q_mask, other=0.0)
        ddn = tl.load(DDN + row, mask=mask_m, other=0.0)
        wt = _dot(kphi, tl.trans(qphi), PREC, INTERPRET)
        dv_l += _dot(wt.to(dn.dtype), dn, PREC, INTERPRET)
        dwt = _dot(v, tl.trans(dn), PREC, INTERPRET) + ddn[None, :]
        dkphi += _dot(dwt.to(qphi.dtype), qphi, PREC, INTERPRET)
    return dk, dv, dv_l, dkphi


@triton.jit
def _sla_bwd_dkdv(pid_n, bh, Q, K, V, QPHI, KPHI, DOS, LSE, DELTA, DN, DDN,
                  COLC_OFF, COLC_IDX, COLL_OFF, COLL_IDX, DK, DV, DKPHI,
                  Lq, Lk, D, Mk, NCOLC, NCOLL, qk_scale, sm_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  LINEAR_MODE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < Lk
    mask_d = offs_d < D
    kv_off = bh * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    q_base = bh * Lq * D
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_l = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkphi = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if LINEAR_MODE != 0:
        kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
    else:
        kphi = k

    # the query blocks that visit this key block (column LUT in CSR form)
    c_start = tl.load(COLC_OFF + bh * (Mk + 1) + pid_n)
    c_end = tl.load(COLC_OFF + bh * (Mk + 1) + pid_n + 1)
    l_start = tl.load(COLL_OFF + bh * (Mk + 1) + pid_n)
    l_end = tl.load(COLL_OFF + bh * (Mk + 1) + pid_n + 1)
    colc = COLC_IDX + bh * NCOLC
    coll = COLL_IDX + bh * NCOLL
    if INTERPRET:
        t = c_start
        while t < c_end:
            dk, dv, dv_l, dkphi = _dkdv_step(tl.load(colc + t), k, v, kphi, dk, dv, dv_l, dkphi, Q, QPHI, DOS, LSE,
                                             DELTA, DN, DDN, q_base, offs_mb, offs_d, mask_n, mask_d, Lq, D,
                                             qk_scale, BLOCK_M, True, LINEAR_MODE == 1, PREC, INTERPRET)
            t += 1
        if LINEAR_MODE != 0:
            t = l_start
            while t < l_end:
                dk, dv, dv_l, dkphi = _dkdv_step(tl.load(coll + t), k, v, kphi, dk, dv, dv_l, dkphi, Q, QPHI, DOS,
                                                 LSE, DELTA, DN, DDN, q_base, offs_mb, offs_d, mask_n, mask_d, Lq, D,
                                                 qk_scale, BLOCK_M, False, True, PREC, INTERPRET)
                t += 1
    else:
        for t in range(c_start, c_end):
            dk, dv, dv_l, dkphi = _dkdv_step(tl.load(colc + t), k, v, kphi, dk, dv, dv_l, dkphi, Q, QPHI, DOS, LSE,
                                             DELTA, DN, DDN, q_base, offs_mb, offs_d, mask_n, mask_d, Lq, D,
                                             qk_scale, BLOCK_M, True, LINEAR_MODE == 1, PREC, INTERPRET)
        if LINEAR_MODE != 0:
            for t in range(l_start, l_end):
                dk, dv, dv_l, dkphi = _dkdv_step(tl.load(coll + t), k, v, kphi, dk, dv, dv_l, dkphi, Q, QPHI, DOS,
                                                 LSE, DELTA, DN, DDN, q_base, offs_mb, offs_d, mask_n, mask_d, Lq, D,
                                                 qk_scale, BLOCK_M, False, True, PREC, INTERPRET)

    if LINEAR_MODE != 0:
        if LINEAR_MODE == 1:
            dv_l = -dv_l
            dkphi = -dkphi
        tl.store(DKPHI + kv_off, dkphi, mask=kv_mask)
    tl.store(DK + kv_off, dk * sm_scale, mask=kv_mask)
    tl.store(DV + kv_off, dv + dv_l, mask=kv_mask)


@triton.jit
def _sla_bwd_kernel(Q, K, V, QPHI, KPHI, DOS, LSE, DELTA, DN, DDN, LUT_C, LUT_L,
                    COLC_OFF, COLC_IDX, COLL_OFF, COLL_IDX, DQ, DQPHI, DK, DV, DKPHI,
                    Lq, Lk, D, Mq, Mk, NC, NL, NCOLC, NCOLL, qk_scale, sm_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    LINEAR_MODE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    # One launch: the first Mq programs of each head produce dQ (row LUT), the next Mk produce
    # dK/dV (column LUT), so no atomics are needed and both halves run concurrently.
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if pid < Mq:
        _sla_bwd_dq(pid, bh, Q, K, V, QPHI, KPHI, DOS, LSE, DELTA, DN, DDN, LUT_C, LUT_L, DQ, DQPHI,
                    Lq, Lk, D, Mq, NC, NL, qk_scale, sm_scale,
                    BLOCK_M, BLOCK_N, BLOCK_D, LINEAR_MODE, PREC, INTERPRET)
    else:
        _sla_bwd_dkdv(pid - Mq, bh, Q, K, V, QPHI, KPHI, DOS, LSE, DELTA, DN, DDN,
                      COLC_OFF, COLC_IDX, COLL_OFF, COLL_IDX, DK, DV, DKPHI,
                      Lq, Lk, D, Mk, NCOLC, NCOLL, qk_scale, sm_scale,
                      BLOCK_M, BLOCK_N, BLOCK_D, LINEAR_MODE, PREC, INTERPRET)


def _non_empty(t: torch.Tensor) -> torch.Tensor:
    """Empty LUTs still need a valid pointer; their loop counts are zero, so it is never read."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


# (num_warps, num_stages) per pass, by query-block size. One warpgroup (4 warps) per 64 query rows
# lets Hopper issue m64 wgmma tiles in the forward; the backward prefers 8. Picked by the sweep in
# benchmarks/attention/bench_sla.py on an H100 (NOTES_sla.md); 3 backward stages overflow shared memory.
# The benchmark overrides entries to sweep them.
TUNING: dict[tuple[str, int], tuple[int, int]] = {
    ("fwd", 16): (4, 2), ("fwd", 32): (4, 2), ("fwd", 64): (4, 3), ("fwd", 128): (8, 3),
    ("bwd", 16): (4, 2), ("bwd", 32): (4, 2), ("bwd", 64): (8, 2), ("bwd", 128): (8, 2),
}


def _launch_params(head_dim: int, dtype: torch.dtype, which: str, block: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_warps, num_stages = TUNING[(which, block)]
    return dict(BLOCK_D=block_d, PREC="ieee" if dtype == torch.float32 else "tf32",
                INTERPRET=triton_interpreter_on(), num_warps=num_warps, num_stages=num_stages)


def sla_forward(q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, linear_mode: int, scale: float, eps: float,
                block_q: int, block_k: int):
    """q, qphi [BH, Lq, D]; k, v, kphi [BH, Lk, D]; lut_c [BH, Mq, NC], lut_l [BH, Mq, NL] int32.
    Returns o_s [BH, Lq, D] (q's dtype), lse2 [BH, Lq], o_l [BH, Lq, D] fp32, den [BH, Lq] fp32."""
    bh, lq, d = q.shape
    lk = k.shape[1]
    mq = lut_c.shape[1]
    o_s = torch.empty_like(q)
    lse = torch.empty(bh, lq, device=q.device, dtype=torch.float32)
    o_l = torch.empty(bh, lq, d, device=q.device, dtype=torch.float32)
    den = torch.empty(bh, lq, device=q.device, dtype=torch.float32)
    params = _launch_params(d, q.dtype, "fwd", block_q)
    num_lin = lut_l.shape[2]
    _sla_fwd_kernel[(mq, bh)](q, k, v, qphi, kphi, htot, ztot, lut_c, _non_empty(lut_l), o_s, lse, o_l, den,
                              lq, lk, d, mq, lut_c.shape[2], num_lin, scale * LOG2E, eps,
                              BLOCK_M=block_q, BLOCK_N=block_k, LINEAR_MODE=linear_mode, **params)
    return o_s, lse, o_l, den


def column_lut(lut: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose a row LUT [BH, Mq, N] into CSR form per head: offsets [BH, Mk+1], query-block ids
    [BH, Mq*N] sorted by key block, so each key block finds the query blocks that visit it."""
    bh, mq, n = lut.shape
    flat = lut.reshape(bh, mq * n).long()
    if n == 0:
        return (torch.zeros(bh, num_key_blocks + 1, dtype=torch.int32, device=lut.device),
                torch.zeros(bh, 1, dtype=torch.int32, device=lut.device))
    order = torch.argsort(flat, dim=1, stable=True)
    rows = (order // n).to(torch.int32)
    counts = torch.zeros(bh, num_key_blocks, dtype=torch.int64, device=lut.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    offsets = torch.zeros(bh, num_key_blocks + 1, dtype=torch.int64, device=lut.device)
    offsets[:, 1:] = counts.cumsum(1)
    return offsets.to(torch.int32).contiguous(), rows.contiguous()


def sla_backward(q, k, v, qphi, kphi, do_s, lse, delta, dn, ddn, lut_c, lut_l, linear_mode: int, scale: float,
                 block_q: int, block_k: int):
    """Gradients of the kernel's (o_s, o_l) w.r.t. q, k, v and the in-kernel part of qphi, kphi.

    ``delta`` = rowsum(dO_s * O_s), ``dn`` = dO_l / den (q's dtype), ``ddn`` = -rowsum(dO_l * O_l) / den.
    Returns fp32 dq, dk, dv, dqphi (kernel part), dkphi (kernel part)."""
    bh, lq, d = q.shape
    lk = k.shape[1]
    mq = lut_c.shape[1]
    mk = -(-lk // block_k)
    colc_off, colc_idx = column_lut(lut_c, mk)
    coll_off, coll_idx = column_lut(lut_l, mk)
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(bh, lq, d, **f32)
    dk = torch.empty(bh, lk, d, **f32)
    dv = torch.empty(bh, lk, d, **f32)
    dqphi = torch.zeros(bh, lq, d, **f32)
    dkphi = torch.zeros(bh, lk, d, **f32)
    params = _launch_params(d, q.dtype, "bwd", max(block_q, block_k))
    _sla_bwd_kernel[(mq + mk, bh)](q, k, v, qphi, kphi, do_s, lse, delta, dn, ddn, lut_c, _non_empty(lut_l),
                                   colc_off, colc_idx, coll_off, coll_idx, dq, dqphi, dk, dv, dkphi,
                                                   lq, lk, d, mq, mk, lut_c.shape[2], lut_l.shape[2],
                                   colc_idx.shape[1], coll_idx.shape[1], scale * LOG2E, scale,
                                   BLOCK_M=block_q, BLOCK_N=block_k, LINEAR_MODE=linear_mode, **params)
    return dq, dk, dv, dqphi, dkphi

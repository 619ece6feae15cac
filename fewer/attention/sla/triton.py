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
def _dot_acc(a, b, acc, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b, accumulated in place (the accumulator's registers hold the result)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _feature_map_tile(x, mask_d, PHI: tl.constexpr):
    """phi over the head dim of a [M, BLOCK_D] tile in fp32 (PHI 1 softmax, 2 elu+1, 3 relu); padded
    head-dim columns give 0. The inference forward computes phi(Q) here instead of reading it."""
    xf = x.to(tl.float32)
    if PHI == 1:
        xm = tl.where(mask_d[None, :], xf, float("-inf"))
        e = tl.exp(xm - tl.max(xm, 1)[:, None])
        y = e / tl.sum(e, 1)[:, None]
    elif PHI == 2:
        y = tl.where(xf > 0, xf + 1.0, tl.exp(xf))
    else:
        y = tl.maximum(xf, 0.0)
    return tl.where(mask_d[None, :], y, 0.0)


@triton.jit
def _key_rows(LUT, t, N, offs_n, Lk, BLOCK_N: tl.constexpr, PAIR: tl.constexpr):
    """Token rows (and their validity) of the key blocks LUT[t] (PAIR 1) or LUT[t], LUT[t+1] (PAIR 2:
    one tile of 2*BLOCK_N rows, so each matmul has twice the width; a missing second block is masked)."""
    if PAIR == 1:
        offs_k = tl.load(LUT + t) * BLOCK_N + offs_n
        return offs_k, offs_k < Lk
    else:
        j0 = tl.load(LUT + t)
        j1 = tl.load(LUT + t + 1, mask=t + 1 < N, other=-1)
        second = offs_n >= BLOCK_N
        jj = tl.where(second, j1, j0)
        offs_k = jj * BLOCK_N + tl.where(second, offs_n - BLOCK_N, offs_n)
        return offs_k, (offs_k < Lk) & (jj >= 0)


@triton.jit
def _fwd_critical_step(offs_k, mask_k, q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_d, mask_d,
                       D, qk_scale, LINEAR_MODE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
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
def _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d, D,
                     PREC: tl.constexpr, INTERPRET: tl.constexpr, NEG: tl.constexpr = False):
    kv_off = k_base + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = mask_k[:, None] & mask_d[None, :]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
    w = _dot(qphi, tl.trans(kphi), PREC, INTERPRET)
    if NEG:  # subtract the block from sums that start at the totals (exact negation)
        w = -w
    acc_l = _dot_acc(w.to(v.dtype), v, acc_l, PREC, INTERPRET)
    den_l += tl.sum(w, 1)
    return acc_l, den_l


@triton.jit
def _sla_fwd_kernel(Q, K, V, QPHI, KPHI, HTOT, ZTOT, LUT_C, LUT_L, WPT, BP, OUT, OS, LSE, OL, DEN,
                    Lq, Lk, D, Mq, NC, NL, qk_scale, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    LINEAR_MODE: tl.constexpr, FUSE_PROJ: tl.constexpr, SAVE: tl.constexpr, PHI_Q: tl.constexpr,
                    PAIR: tl.constexpr, HILO: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        if PHI_Q == 0:
            qphi = tl.load(QPHI + q_off, mask=q_mask, other=0.0)
        else:
            qphi = _feature_map_tile(q, mask_d, PHI_Q).to(q.dtype)
    else:
        qphi = q

    lut_c = LUT_C + (bh * Mq + pid_m) * NC
    lut_l = LUT_L + (bh * Mq + pid_m) * NL
    offs_p = tl.arange(0, BLOCK_N * PAIR)
    if INTERPRET:
        # the interpreter (numpy >= 2.4) cannot take a runtime bound in range(); compiled code
        # keeps the for loops, which Triton software-pipelines
        t = 0
        while t < NC:
            offs_k, mask_k = _key_rows(lut_c, t, NC, offs_p, Lk, BLOCK_N, PAIR)
            m_i, l_i, acc, acc_l, den_l = _fwd_critical_step(
                offs_k, mask_k, q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_d, mask_d, D,
                qk_scale, LINEAR_MODE, PREC, INTERPRET)
            t += PAIR
        if LINEAR_MODE != 0:
            t = 0
            while t < NL:
                offs_k, mask_k = _key_rows(lut_l, t, NL, offs_p, Lk, BLOCK_N, PAIR)
                acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                                D, PREC, INTERPRET)
                t += PAIR
    else:
        for t in range(0, NC, PAIR):
            offs_k, mask_k = _key_rows(lut_c, t, NC, offs_p, Lk, BLOCK_N, PAIR)
            m_i, l_i, acc, acc_l, den_l = _fwd_critical_step(
                offs_k, mask_k, q, qphi, m_i, l_i, acc, acc_l, den_l, K, V, KPHI, k_base, offs_d, mask_d, D,
                qk_scale, LINEAR_MODE, PREC, INTERPRET)
        if LINEAR_MODE != 0:
            for t in range(0, NL, PAIR):
                offs_k, mask_k = _key_rows(lut_l, t, NL, offs_p, Lk, BLOCK_N, PAIR)
                acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                                D, PREC, INTERPRET)

    o_s = acc / l_i[:, None]
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    if LINEAR_MODE == 0:
        tl.store(OS + q_off, o_s.to(OS.dtype.element_ty), mask=q_mask)
    else:
        _linear_epilogue(o_s, acc_l, den_l, qphi, HTOT, ZTOT, WPT, BP, OUT, OS, OL, DEN, bh, q_off, q_mask, offs_m,
                         mask_m, offs_d, mask_d, Lq, D, eps, LINEAR_MODE, FUSE_PROJ, SAVE, SAVE, False, HILO, False,
                         PREC, INTERPRET)


@triton.jit
def _linear_epilogue(o_s, acc_l, den_l, qphi, HTOT, ZTOT, WPT, BP, OUT, OS, OL, DEN, bh, q_off, q_mask, offs_m,
                     mask_m, offs_d, mask_d, Lq, D, eps, LINEAR_MODE: tl.constexpr, FUSE_PROJ: tl.constexpr,
                     WRITE_OS: tl.constexpr, WRITE_PARTS: tl.constexpr, LOAD_OS: tl.constexpr, HILO: tl.constexpr,
                     FOLD: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """O_l = num / den from the in-kernel sums (subtracted from the totals in mode 1); with FUSE_PROJ
    writes OUT = O_s + O_l @ Wp^T + b (fp32 until the one rounding); WRITE_OS / WRITE_PARTS write
    O_s / (O_l, den), the parts the backward needs; LOAD_OS reads O_s (split forward) just before use.

    Register use is kept low (no fp32 copy of phi(Q)): with HILO, H_tot arrives as two bf16 matrices
    hi + lo (~16 significant bits, finer than tf32) multiplied with the bf16 phi(Q) tile already in
    registers, accumulated in place onto -acc_l; the projection accumulates onto O_s in place.
    FOLD: the projection was folded into V and H_tot (V' = V Wp^T), so O_l is already projected."""
    if LINEAR_MODE == 1:
        ztot = tl.load(ZTOT + bh * D + offs_d, mask=mask_d, other=0.0)
        den = tl.sum(qphi.to(tl.float32) * ztot[None, :], 1) - den_l
        h_mask = mask_d[:, None] & mask_d[None, :]
        if HILO:
            h_off = bh * 2 * D * D + offs_d[:, None] * D + offs_d[None, :]
            h_hi = tl.load(HTOT + h_off, mask=h_mask, other=0.0)
            num = _dot_acc(qphi, h_hi, -acc_l, PREC, INTERPRET)
            h_lo = tl.load(HTOT + D * D + h_off, mask=h_mask, other=0.0)
            num = _dot_acc(qphi, h_lo, num, PREC, INTERPRET)
        else:
            h_off = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
            htot = tl.load(HTOT + h_off, mask=h_mask, other=0.0)
            num = _dot_acc(qphi.to(tl.float32), htot, -acc_l, PREC, INTERPRET)
    else:
        num = acc_l
        den = den_l
    den = den + eps
    o_l = num / den[:, None]
    if WRITE_PARTS:
        tl.store(OL + q_off, o_l, mask=q_mask)
        tl.store(DEN + bh * Lq + offs_m, den, mask=mask_m)
    if FUSE_PROJ:
        if FOLD:
            bias = tl.load(BP + offs_d, mask=mask_d, other=0.0)
            if LOAD_OS:
                o_s = tl.load(OS + q_off, mask=q_mask, other=0.0).to(tl.float32)
            out = o_s + o_l + bias[None, :]
        else:
            w_off = offs_d[:, None] * D + offs_d[None, :]
            wpt = tl.load(WPT + w_off, mask=mask_d[:, None] & mask_d[None, :], other=0.0)
            bias = tl.load(BP + offs_d, mask=mask_d, other=0.0)
            if LOAD_OS:
                o_s = tl.load(OS + q_off, mask=q_mask, other=0.0).to(tl.float32)
            if WRITE_OS:
                tl.store(OS + q_off, o_s.to(OS.dtype.element_ty), mask=q_mask)
            out = _dot_acc(o_l, wpt, o_s, PREC, INTERPRET) + bias[None, :]
        tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=q_mask)
    elif WRITE_OS:
        tl.store(OS + q_off, o_s.to(OS.dtype.element_ty), mask=q_mask)


@triton.jit
def _sla_fwd_linear_kernel(Q, QPHI, V, KPHI, HTOT, ZTOT, LUT_C, LUT_L, WPT, BP, OUT, OS, OL, DEN,
                           Lq, Lk, D, Mq, NC, NL, eps,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           LINEAR_MODE: tl.constexpr, FUSE_PROJ: tl.constexpr, SAVE: tl.constexpr,
                           PHI_Q: tl.constexpr, PAIR: tl.constexpr, HILO: tl.constexpr, FOLD: tl.constexpr,
                           PRE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """The linear part alone (the split forward): after the sparse kernel has written O_s, sum
    (phi(Q) phi(K_j)^T) V_j over the blocks to subtract (mode 1: critical + negligible) or to add
    (mode 2: marginal). Only one fp32 accumulator per program, so it needs no softmax state.
    PRE (mode 1): the accumulators start from phi(Q) H_tot, phi(Q) Z_tot before the loops and the
    blocks are subtracted in place, so the epilogue has no H_tot products."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    q_off = bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    k_base = bh * Lk * D
    if PHI_Q == 0:
        qphi = tl.load(QPHI + q_off, mask=q_mask, other=0.0)
    else:
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        qphi = _feature_map_tile(q, mask_d, PHI_Q).to(q.dtype)
    if PRE and LINEAR_MODE == 1:
        acc_l, den_l = _totals_start(qphi, HTOT, ZTOT, bh, offs_d, mask_d, D, HILO, PREC, INTERPRET)
    else:
        acc_l = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        den_l = tl.zeros([BLOCK_M], tl.float32)
    NEG: tl.constexpr = PRE and LINEAR_MODE == 1
    lut_c = LUT_C + (bh * Mq + pid_m) * NC
    lut_l = LUT_L + (bh * Mq + pid_m) * NL
    offs_p = tl.arange(0, BLOCK_N * PAIR)
    if INTERPRET:
        if LINEAR_MODE == 1:
            t = 0
            while t < NC:
                offs_k, mask_k = _key_rows(lut_c, t, NC, offs_p, Lk, BLOCK_N, PAIR)
                acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                                D, PREC, INTERPRET, NEG)
                t += PAIR
        t = 0
        while t < NL:
            offs_k, mask_k = _key_rows(lut_l, t, NL, offs_p, Lk, BLOCK_N, PAIR)
            acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                            D, PREC, INTERPRET, NEG)
            t += PAIR
    else:
        if LINEAR_MODE == 1:
            for t in range(0, NC, PAIR):
                offs_k, mask_k = _key_rows(lut_c, t, NC, offs_p, Lk, BLOCK_N, PAIR)
                acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                                D, PREC, INTERPRET, NEG)
        for t in range(0, NL, PAIR):
            offs_k, mask_k = _key_rows(lut_l, t, NL, offs_p, Lk, BLOCK_N, PAIR)
            acc_l, den_l = _fwd_linear_step(offs_k, mask_k, qphi, acc_l, den_l, V, KPHI, k_base, offs_d, mask_d,
                                            D, PREC, INTERPRET, NEG)
    # O_s comes from the sparse kernel (read in the epilogue, LOAD_OS); acc_l is a placeholder here
    if NEG:  # the sums already hold totals minus blocks: finish as in direct mode
        _linear_epilogue(acc_l, acc_l, den_l, qphi, HTOT, ZTOT, WPT, BP, OUT, OS, OL, DEN, bh, q_off, q_mask,
                         offs_m, mask_m, offs_d, mask_d, Lq, D, eps, 2, FUSE_PROJ, False, SAVE, True, HILO, FOLD,
                         PREC, INTERPRET)
    else:
        _linear_epilogue(acc_l, acc_l, den_l, qphi, HTOT, ZTOT, WPT, BP, OUT, OS, OL, DEN, bh, q_off, q_mask,
                         offs_m, mask_m, offs_d, mask_d, Lq, D, eps, LINEAR_MODE, FUSE_PROJ, False, SAVE, True, HILO,
                         FOLD, PREC, INTERPRET)


@triton.jit
def _totals_start(qphi, HTOT, ZTOT, bh, offs_d, mask_d, D, HILO: tl.constexpr, PREC: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """(phi(Q) H_tot, phi(Q) Z_tot) for one query tile, fp32 (H_tot as bf16 hi + lo with HILO)."""
    ztot = tl.load(ZTOT + bh * D + offs_d, mask=mask_d, other=0.0)
    den = tl.sum(qphi.to(tl.float32) * ztot[None, :], 1)
    h_mask = mask_d[:, None] & mask_d[None, :]
    if HILO:
        h_off = bh * 2 * D * D + offs_d[:, None] * D + offs_d[None, :]
        h_hi = tl.load(HTOT + h_off, mask=h_mask, other=0.0)
        num = _dot(qphi, h_hi, PREC, INTERPRET)
        h_lo = tl.load(HTOT + D * D + h_off, mask=h_mask, other=0.0)
        num = _dot_acc(qphi, h_lo, num, PREC, INTERPRET)
    else:
        h_off = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
        htot = tl.load(HTOT + h_off, mask=h_mask, other=0.0)
        num = _dot(qphi.to(tl.float32), htot, PREC, INTERPRET)
    return num, den


@triton.jit
def _sla_phi_pool_kernel(X, PHI_OUT, POOL, L, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PHI: tl.constexpr,
                         WRITE_PHI: tl.constexpr):
    """One read of X [BH, L, D] (Q or K) for the inference forward: the fp32 mean of every BLOCK_N-token
    block (POOL [BH, ceil(L/BLOCK_N), D], = reference.pool_blocks) and, with WRITE_PHI, phi(X) in X's
    dtype (PHI 1 softmax, 2 elu+1, 3 relu over the head dim). Replaces a torch softmax and a torch
    mean over the same tensor."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    off = bh * L * D + offs_n[:, None] * D + offs_d[None, :]
    mask = (offs_n < L)[:, None] & mask_d[None, :]
    x = tl.load(X + off, mask=mask, other=0.0)
    tokens = tl.minimum(L - j * BLOCK_N, BLOCK_N)
    tl.store(POOL + (bh * tl.num_programs(0) + j) * D + offs_d, tl.sum(x.to(tl.float32), 0) / tokens, mask=mask_d)
    if WRITE_PHI:
        tl.store(PHI_OUT + off, _feature_map_tile(x, mask_d, PHI).to(PHI_OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sla_totals_kernel(KPHI, V, HPART, ZPART, WHL, VP, Lk, D, CHUNK_TILES,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PROJ_V: tl.constexpr, PREC: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """Partial totals over one chunk of keys: HPART[bh, c] = phi(K_c)^T V_c, ZPART[bh, c] = sum phi(K_c),
    from the low-precision phi(K), V tiles with fp32 accumulation (the same products the forward
    kernel subtracts per block). The host sums the chunks.

    PROJ_V (the folded projection, inference): V is first mapped to V' = V Wp^T (WHL: Wp^T as bf16
    hi [D, D] then lo [D, D]; fp32 accumulation), V' is stored in bf16 (VP) and the totals are taken
    over the stored V', so the linear kernel subtracts exactly the products that H'_tot holds."""
    pid_c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    k_base = bh * Lk * D
    if PROJ_V:
        w_off = offs_d[:, None] * D + offs_d[None, :]
        w_mask = mask_d[:, None] & mask_d[None, :]
        w_hi = tl.load(WHL + w_off, mask=w_mask, other=0.0)
        w_lo = tl.load(WHL + D * D + w_off, mask=w_mask, other=0.0)
    else:
        w_hi = 0.0
        w_lo = 0.0
    if INTERPRET:
        t = 0
        while t < CHUNK_TILES:
            acc, z = _totals_step(pid_c * CHUNK_TILES + t, acc, z, KPHI, V, VP, w_hi, w_lo, k_base, offs_n, offs_d,
                                  mask_d, Lk, D, BLOCK_N, PROJ_V, PREC, INTERPRET)
            t += 1
    else:
        for t in range(CHUNK_TILES):
            acc, z = _totals_step(pid_c * CHUNK_TILES + t, acc, z, KPHI, V, VP, w_hi, w_lo, k_base, offs_n, offs_d,
                                  mask_d, Lk, D, BLOCK_N, PROJ_V, PREC, INTERPRET)
    part = bh * n_chunks + pid_c
    h_off = part * D * D + offs_d[:, None] * D + offs_d[None, :]
    tl.store(HPART + h_off, acc, mask=mask_d[:, None] & mask_d[None, :])
    tl.store(ZPART + part * D + offs_d, z, mask=mask_d)


@triton.jit
def _totals_step(j, acc, z, KPHI, V, VP, w_hi, w_lo, k_base, offs_n, offs_d, mask_d, Lk, D, BLOCK_N: tl.constexpr,
                 PROJ_V: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    offs_k = j * BLOCK_N + offs_n
    kv_off = k_base + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = (offs_k < Lk)[:, None] & mask_d[None, :]
    kphi = tl.load(KPHI + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if PROJ_V:
        vp = _dot_acc(v, w_lo, _dot(v, w_hi, PREC, INTERPRET), PREC, INTERPRET).to(VP.dtype.element_ty)
        tl.store(VP + kv_off, vp, mask=kv_mask)
        v = vp
    acc += _dot(tl.trans(kphi), v, PREC, INTERPRET)
    z += tl.sum(kphi.to(tl.float32), 0)
    return acc, z


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


@triton.jit
def _sla_plan_kernel(SCORES, CRIT, NEG, CLS, Mk, NCRIT, NNEG, MK_P2: tl.constexpr):
    """One row of the block plan: sort the row's key-block scores (descending, ties to the lower
    block id) and write the top NCRIT ids (best first), the bottom NNEG ids (worst first) and the
    row of the class map (1 critical, -1 negligible, 0 marginal). Scores are packed with their
    block id into one int64 key: an order-preserving map of the fp32 bits in the high word."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, MK_P2)
    valid = offs < Mk
    s = tl.load(SCORES + row * Mk + offs, mask=valid, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-int order == float order
    packed = (key.to(tl.int64) << 32) | (MK_P2 - 1 - offs).to(tl.int64)
    packed = tl.sort(packed, descending=True)
    low = packed - ((packed >> 32) << 32)
    ids = (MK_P2 - 1 - low).to(tl.int32)
    tl.store(CRIT + row * NCRIT + offs, ids, mask=offs < NCRIT)
    neg_pos = Mk - 1 - offs  # the worst block first
    tl.store(NEG + row * NNEG + neg_pos, ids, mask=valid & (neg_pos < NNEG))
    cls = tl.where(offs < NCRIT, 1, tl.where(neg_pos < NNEG, -1, 0)).to(tl.int8)
    tl.store(CLS + row * Mk + ids, cls, mask=valid)


def sla_plan(scores: torch.Tensor, n_crit: int, n_neg: int):
    """(critical [.., Mq, n_crit], negligible [.., Mq, n_neg] int32, classes [.., Mq, Mk] int8) from
    fp32 block scores [..., Mq, Mk]: the same sets and orders as torch.topk (up to ties)."""
    mk = scores.shape[-1]
    lead = scores.shape[:-1]
    scores = scores.contiguous()
    rows = scores.numel() // mk
    crit = torch.empty(*lead, n_crit, device=scores.device, dtype=torch.int32)
    neg = torch.empty(*lead, n_neg, device=scores.device, dtype=torch.int32)
    cls = torch.empty(*lead, mk, device=scores.device, dtype=torch.int8)
    p2 = max(16, triton.next_power_of_2(mk))
    _sla_plan_kernel[(rows,)](scores, crit, _non_empty(neg), cls, mk, n_crit, n_neg, MK_P2=p2,
                              num_warps=4 if p2 <= 1024 else 8)
    return crit, neg, cls


def _non_empty(t: torch.Tensor) -> torch.Tensor:
    """Empty LUTs still need a valid pointer; their loop counts are zero, so it is never read."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


# (num_warps, num_stages) per pass, by query-block size. One warpgroup (4 warps) per 64 query rows
# lets Hopper issue m64 wgmma tiles; the backward prefers 8. "lin" is the linear-part kernel of the
# split forward, "tot" the totals pass, "totp" the totals pass that also writes V' = V Wp^T (FOLD_PROJ;
# it spills at 4 warps). The 64-row entries are the winners of the sweep in
# benchmarks/attention/bench_sla.py (v3, NVIDIA H200, NOTES_sla.md); 3 backward stages overflow shared
# memory. The benchmark overrides entries to sweep them.
TUNING: dict[tuple[str, int], tuple[int, int]] = {
    ("fwd", 16): (4, 2), ("fwd", 32): (4, 2), ("fwd", 64): (4, 2), ("fwd", 128): (8, 3),
    ("lin", 16): (4, 2), ("lin", 32): (4, 2), ("lin", 64): (4, 2), ("lin", 128): (8, 2),
    ("bwd", 16): (4, 2), ("bwd", 32): (4, 2), ("bwd", 64): (8, 2), ("bwd", 128): (8, 2),
    ("tot", 16): (4, 2), ("tot", 32): (4, 2), ("tot", 64): (4, 3), ("tot", 128): (4, 3),
    ("totp", 64): (8, 2),
}
# Split forward (sparse kernel, then the linear-part kernel) instead of one fused kernel, per
# query-block size: two programs with one fp32 accumulator each instead of one holding two. At 64x64
# the fused kernel lost the v3 sweep (module forward 3.98-4.27 ms vs 2.81 ms, H200, NOTES_sla.md).
SPLIT_FORWARD: dict[int, bool] = {16: False, 32: False, 64: True, 128: True}
# The totals pass keeps a BLOCK_D x BLOCK_D fp32 accumulator; larger head dims use PyTorch.
MAX_TOTALS_HEAD_DIM = 128
# Key blocks per loop step of the forward kernels ("fwd": the softmax kernel, "lin": the linear-part
# kernel): 2 gathers two LUT entries into one tile of 2*block_k rows (wider matmuls, half the steps).
PAIR_BLOCKS: dict[str, int] = {"fwd": 1, "lin": 1}
# Inference options of the split forward, the fastest in the v4 sweep (H200, Wan2.1-1.3B, 95%:
# NOTES_sla.md): the projection folded into V and H_tot (V' = V Wp^T from the totals pass, no
# projection matmul in the linear kernel's epilogue) and phi(Q) read rather than computed in the
# kernels (which costs registers: 255 with spills). PRELOAD_TOTALS starts the linear-part sums from
# phi(Q) H_tot and subtracts the blocks in place: within 1% either way, off.
FOLD_PROJ = True
PRELOAD_TOTALS = False
PHI_IN_KERNEL = False
# Inference forward: one Triton pass over each of Q and K gives the pooled blocks of the plan and phi
# (was a torch softmax and a torch mean over each tensor).
PHI_POOL_PASS = True
# The plan pass sorts a whole row of key-block scores in one program; longer rows use torch.topk.
MAX_PLAN_KEY_BLOCKS = 4096


def _launch_params(head_dim: int, dtype: torch.dtype, which: str, block: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_warps, num_stages = TUNING[(which, block)]
    return dict(BLOCK_D=block_d, PREC="ieee" if dtype == torch.float32 else "tf32",
                INTERPRET=triton_interpreter_on(), num_warps=num_warps, num_stages=num_stages)


def _launch(kernel, grid, which: str, block: int, head_dim: int, dtype: torch.dtype, *args, **constexprs):
    """Launch with TUNING's (num_warps, num_stages); if the pipeline does not fit in shared memory,
    retry with one stage fewer and remember that for this pass."""
    params = _launch_params(head_dim, dtype, which, block)
    while True:
        try:
            return kernel[grid](*args, **constexprs, **params)
        except triton.runtime.errors.OutOfResources:
            if params["num_stages"] <= 1:
                raise
            params["num_stages"] -= 1
            TUNING[(which, block)] = (params["num_warps"], params["num_stages"])


def _pair(which: str, block_k: int) -> int:
    return PAIR_BLOCKS[which] if block_k <= 64 else 1


def _empty(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, device=ref.device, dtype=dtype)


def sla_forward(q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, bp, linear_mode: int, scale: float,
                eps: float, block_q: int, block_k: int, fuse_proj: bool = False, save: bool = True,
                split: bool = False, phi_q: int = 0, fold_proj: bool = False):
    """q, qphi [BH, Lq, D]; k, v, kphi [BH, Lk, D]; lut_c [BH, Mq, NC], lut_l [BH, Mq, NL] int32;
    wpt [D, D] fp32 (proj weight transposed), bp [D] fp32: used when ``fuse_proj``.

    Returns (out, o_s, lse2, o_l, den): out [BH, Lq, D] in q's dtype = O_s + O_l @ wpt + bp when
    ``fuse_proj`` (else empty); o_s (q's dtype), o_l fp32, den fp32 when ``save`` or not ``fuse_proj``
    (else empty); lse2 [BH, Lq] fp32 always. ``split`` runs the linear part as its own kernel.
    ``phi_q`` 1/2/3 (softmax/elu/relu): the kernels compute phi(Q) from q (qphi is then not read).
    ``fold_proj`` (inference, subtract mode, bf16, split): htot/ztot are not read; the totals pass
    computes V' = V Wp^T and H'_tot, Z_tot itself and the linear kernel walks V' (no epilogue matmul)."""
    bh, lq, d = q.shape
    lk = k.shape[1]
    mq = lut_c.shape[1]
    if linear_mode == 0:
        fuse_proj = False  # the caller combines (the linear part is 0 or computed in PyTorch)
    parts = save or not fuse_proj
    f32 = dict(device=q.device, dtype=torch.float32)
    lse = torch.empty(bh, lq, **f32)
    out = torch.empty_like(q) if fuse_proj else _empty(q, q.dtype)
    o_s = torch.empty_like(q) if (parts or split) else _empty(q, q.dtype)
    o_l = torch.empty(bh, lq, d, **f32) if (parts and linear_mode != 0) else _empty(q, torch.float32)
    den = torch.empty(bh, lq, **f32) if (parts and linear_mode != 0) else _empty(q, torch.float32)
    if not fuse_proj:
        wpt = bp = _empty(q, torch.float32)
    nc, nl = lut_c.shape[2], lut_l.shape[2]
    lut_l_ptr = _non_empty(lut_l)
    wpt_ptr, bp_ptr = _non_empty(wpt), _non_empty(bp)
    o_l_ptr, den_ptr, out_ptr = _non_empty(o_l), _non_empty(den), _non_empty(out)
    o_s_ptr = _non_empty(o_s)
    fused_mode = 0 if (split or linear_mode == 0) else linear_mode
    fold = fold_proj and fuse_proj and not parts and split and linear_mode == 1
    if fold_proj and not fold:
        raise ValueError("fold_proj needs the inference call (fuse_proj, save=False), the split forward and "
                         "subtract mode")
    v_lin = v
    if fold:
        if q.dtype != torch.bfloat16 or d > MAX_TOTALS_HEAD_DIM:
            raise ValueError(f"fold_proj takes bf16 inputs with head dim <= {MAX_TOTALS_HEAD_DIM}")
        htot, ztot, v_lin = sla_totals(kphi, v, wpt)
    # bf16: H_tot goes to the kernels as bf16 hi + lo (see _linear_epilogue); else fp32 (tf32 products)
    hilo = q.dtype == torch.bfloat16 and linear_mode == 1
    if hilo:
        h_hi = htot.to(torch.bfloat16)
        htot = torch.stack([h_hi, (htot - h_hi.float()).to(torch.bfloat16)], dim=1).contiguous()
    _launch(_sla_fwd_kernel, (mq, bh), "fwd", block_q, d, q.dtype,
            q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l_ptr, wpt_ptr, bp_ptr, out_ptr, o_s_ptr,
            lse, o_l_ptr, den_ptr, lq, lk, d, mq, nc, nl, scale * LOG2E, eps,
            BLOCK_M=block_q, BLOCK_N=block_k, LINEAR_MODE=fused_mode, FUSE_PROJ=fuse_proj, SAVE=parts, PHI_Q=phi_q,
            PAIR=_pair("fwd", block_k), HILO=hilo)
    if split and linear_mode != 0:
        _launch(_sla_fwd_linear_kernel, (mq, bh), "lin", block_q, d, q.dtype,
                q, qphi, v_lin, kphi, htot, ztot, lut_c, lut_l_ptr, wpt_ptr, bp_ptr, out_ptr,
                o_s_ptr, o_l_ptr, den_ptr, lq, lk, d, mq, nc, nl, eps,
                BLOCK_M=block_q, BLOCK_N=block_k, LINEAR_MODE=linear_mode, FUSE_PROJ=fuse_proj, SAVE=parts,
                PHI_Q=phi_q, PAIR=_pair("lin", block_k), HILO=hilo, FOLD=fold, PRE=PRELOAD_TOTALS)
    if not parts:
        o_s = _empty(q, q.dtype)
    return out, o_s, lse, o_l, den


def sla_totals(kphi: torch.Tensor, v: torch.Tensor, wpt: torch.Tensor | None = None):
    """H_tot = phi(K)^T V [BH, D, D] and Z_tot = sum_t phi(K_t) [BH, D], fp32, from kphi, v [BH, Lk, D]
    in their own dtype (fp32 accumulation), split over key chunks so every SM has work.

    With ``wpt`` (Wp^T [D, D] fp32; bf16 inputs): returns (H'_tot, Z_tot, V') with V' = V Wp^T in
    bf16 and H'_tot = phi(K)^T V' (the folded projection of the inference forward)."""
    bh, lk, d = kphi.shape
    block_n = 64
    tiles = -(-lk // block_n)
    chunks = max(1, min(tiles, -(-512 // bh)))  # ~512 programs in all
    chunk_tiles = -(-tiles // chunks)
    chunks = -(-tiles // chunk_tiles)
    hpart = torch.empty(bh, chunks, d, d, device=kphi.device, dtype=torch.float32)
    zpart = torch.empty(bh, chunks, d, device=kphi.device, dtype=torch.float32)
    proj_v = wpt is not None
    if proj_v:
        w_hi = wpt.to(torch.bfloat16)
        whl = torch.stack([w_hi, (wpt - w_hi.float()).to(torch.bfloat16)]).contiguous()
        vp = torch.empty_like(v)
    else:
        whl = vp = _empty(v, v.dtype)
    _launch(_sla_totals_kernel, (chunks, bh), "totp" if proj_v else "tot", block_n, d, kphi.dtype,
            kphi, v, hpart, zpart, _non_empty(whl), _non_empty(vp), lk, d, chunk_tiles, BLOCK_N=block_n,
            PROJ_V=proj_v)
    if proj_v:
        return hpart.sum(1), zpart.sum(1), vp
    return hpart.sum(1), zpart.sum(1)


def sla_phi_pool(x: torch.Tensor, block: int, phi: int, write_phi: bool = True):
    """(phi(x) in x's dtype or None, block means [BH, ceil(L/block), D] fp32) of x [BH, L, D] in one
    pass; ``phi`` 1/2/3 = softmax/elu+1/relu over the head dim."""
    bh, length, d = x.shape
    blocks = -(-length // block)
    pooled = torch.empty(bh, blocks, d, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x) if write_phi else _empty(x, x.dtype)
    _sla_phi_pool_kernel[(blocks, bh)](x, _non_empty(out), pooled, length, d, BLOCK_N=block,
                                       BLOCK_D=max(16, triton.next_power_of_2(d)), PHI=phi, WRITE_PHI=write_phi,
                                       num_warps=4)
    return (out if write_phi else None), pooled


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
    _launch(_sla_bwd_kernel, (mq + mk, bh), "bwd", max(block_q, block_k), d, q.dtype,
            q, k, v, qphi, kphi, do_s, lse, delta, dn, ddn, lut_c, _non_empty(lut_l),
            colc_off, colc_idx, coll_off, coll_idx, dq, dqphi, dk, dv, dkphi,
            lq, lk, d, mq, mk, lut_c.shape[2], lut_l.shape[2],
            colc_idx.shape[1], coll_idx.shape[1], scale * LOG2E, scale,
            BLOCK_M=block_q, BLOCK_N=block_k, LINEAR_MODE=linear_mode)
    return dq, dk, dv, dqphi, dkphi

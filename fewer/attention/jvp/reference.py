"""Pure-PyTorch JVP attention: the oracle, the kernel's twin, and the backward.

Notation, [B, H, L, D] layout, s = scale:

    S = s Q K^T          P = softmax(S)           O = P V
    tS = s (tQ K^T + Q tK^T)                      (tangent of S)
    mu = rowsum(P * tS)                           (tangent of the log-normalizer)
    tP = P * (tS - mu)                            (tangent of softmax)
    tO = tP V + P tV = (P * tS) V - mu O + P tV

Four functions:

- ``attention_reference``: softmax(QK^T)V in plain torch ops, so torch.func.jvp, forward_ad and double
  backward all work through it (the CPU path of the ``jvp`` backend);
- ``jvp_attention_exact``: the formulas above with whole rows of P, chunked over queries so memory is
  O(chunk x Lk); the accuracy oracle (on float64 inputs) and the "chunked exact PyTorch JVP" baseline;
- ``jvp_attention_blockwise``: the Triton kernel's twin, one pass over key blocks with online softmax and
  the kernel's casts (P and P*tS rounded to the input dtype before the products with V and tV);
- ``jvp_attention_backward`` / ``attention_backward``: gradients of (O, tO) w.r.t. all six inputs, and of
  O w.r.t. (Q, K, V), by recomputation chunked over queries (the backward of the Triton path).
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def rescale_slack_for(dtype: torch.dtype) -> float:
    """Slack of the lazy running max (log2 units) for inputs of ``dtype``, kernel and twin alike.

    P~ <= 2^slack and P~ (tS - c) are rounded to the operand dtype: fp16 (max 65504) could overflow
    at a large tangent, so fp16 keeps P~ <= 1 (slack 0: rescale whenever any row's max grows); bf16
    and fp32 take 8, as FlashAttention-4 does. The price in bf16: the winning key's P~ is no longer
    exactly 1, so it is rounded too (~10% more error in O than the classic schedule, measured on CPU).
    """
    return 0.0 if dtype == torch.float16 else 8.0


def _causal_keep(q_start: int, q_stop: int, lk: int, device: torch.device) -> torch.Tensor:
    """Top-left aligned causal mask rows [q_start, q_stop): query i sees keys j <= i (torch's convention)."""
    rows = torch.arange(q_start, q_stop, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    return cols <= rows


def _chunks(length: int, chunk_size: int | None):
    step = length if not chunk_size else max(1, int(chunk_size))
    for start in range(0, length, step):
        yield start, min(start + step, length)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                        scale: float | None = None, *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(s Q K^T) V in ``compute_dtype``, output in q's dtype; differentiable in every AD mode."""
    s = default_scale(q, scale)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = (qf @ kf.transpose(-2, -1)) * s
    if is_causal:
        keep = _causal_keep(0, q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    # Softmax spelled out: torch.softmax's forward-AD rule writes into its saved output, which breaks
    # backward through a forward_ad tangent (torch 2.13). The max is a constant shift, so detaching it
    # changes no derivative.
    weights = torch.exp(scores - scores.detach().amax(dim=-1, keepdim=True))
    probs = weights / weights.sum(dim=-1, keepdim=True)
    return (probs @ vf).to(q.dtype)


def jvp_attention_exact(q, k, v, tq, tk, tv, is_causal: bool = False, scale: float | None = None, *,
                        compute_dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO) from the closed-form tangent, rows of P whole; outputs in q's dtype.

    Pass float64 inputs and ``compute_dtype=torch.float64`` for the oracle. ``chunk_size`` bounds the
    score block to chunk x Lk (memory linear in L for a fixed chunk). Differentiable by autograd.
    """
    s = default_scale(q, scale)
    kf, vf, tkf, tvf = (t.to(compute_dtype) for t in (k, v, tk, tv))
    outs, touts = [], []
    for start, stop in _chunks(q.shape[-2], chunk_size):
        qc = q[..., start:stop, :].to(compute_dtype)
        tqc = tq[..., start:stop, :].to(compute_dtype)
        scores = (qc @ kf.transpose(-2, -1)) * s
        if is_causal:
            keep = _causal_keep(start, stop, k.shape[-2], q.device)
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        t_scores = (tqc @ kf.transpose(-2, -1) + qc @ tkf.transpose(-2, -1)) * s
        weighted = probs * t_scores                          # P * tS (zero where masked)
        mu = weighted.sum(-1, keepdim=True)
        out = probs @ vf
        t_out = weighted @ vf - mu * out + probs @ tvf
        outs.append(out.to(q.dtype))
        touts.append(t_out.to(q.dtype))
    return torch.cat(outs, dim=-2), torch.cat(touts, dim=-2)


def jvp_attention_blockwise(q, k, v, tq, tk, tv, is_causal: bool = False, scale: float | None = None, *,
                            block_n: int = 64, block_m: int | None = None, centre: bool = True,
                            rescale_slack: float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel's twin: (O, tO, LSE) in one pass over key blocks with online softmax.

    Same arithmetic as the kernel: scores and accumulators in float32, exponentials in base 2 with
    the running max m, every accumulator rescaled by alpha = exp2(m_old - m_new) when m moves, and
    P~ and P~ * (tS - c) rounded to the input dtype before the products with tV and V (the tensor
    cores' operand precision). LSE is the natural-log normalizer, float32, shape [..., Lq].

    Lazy max: m moves only where a block's row max exceeds it by more than ``rescale_slack`` (log2
    units; default ``rescale_slack_for(dtype)`` like the kernel; 0 = the classic schedule). Any m
    cancels in O = Ao / l, so this is exact; it bounds P~ by 2^slack. The kernel decides per tile of
    BLOCK_M rows (all rows move when any row needs it); ``block_m`` makes the twin decide per the same
    tiles (None: per row), so kernel and twin round the same values.

    The centring c: tO = sum_j P_j (tS_j - mu) V_j + P tV with mu = rowsum(P tS). Accumulating
    (P tS) V and subtracting mu O at the end cancels badly when attention is peaked (tS_j ~ mu at the
    winning key), and the 16-bit rounding of P tS then dominates. Instead each block uses the running
    estimate c = r / l of mu (r = sum P~ tS, l = sum P~, both float32, this block included) and
    multiplies V by P~ (tS - c), which is small exactly where cancellation would hurt. When c moves,
    the accumulator is re-centred: sum_old P~ (tS - c_new) V = acc_t + (c_old - c_new) acc_o. At the
    end c = mu, so tO = acc_t / l with no subtraction. ``centre=False`` keeps c = 0 and subtracts
    mu O at the end (the rCM kernel's formulation): the ablation the tests compare against.
    """
    s = default_scale(q, scale)
    slack = rescale_slack_for(q.dtype) if rescale_slack is None else rescale_slack
    lq, lk = q.shape[-2], k.shape[-2]
    qf, kf, tqf, tkf = (t.float() for t in (q, k, tq, tk))
    operand = v.dtype
    lead = q.shape[:-2]
    m_i = torch.full((*lead, lq), float("-inf"), device=q.device)
    l_i = torch.zeros((*lead, lq), device=q.device)
    r_i = torch.zeros((*lead, lq), device=q.device)        # running sum of P~ * tS
    c_i = torch.zeros((*lead, lq), device=q.device)        # running estimate of mu = r / l
    acc_o = torch.zeros((*lead, lq, v.shape[-1]), device=q.device)
    acc_t = torch.zeros_like(acc_o)                        # running P~ tV + (P~ * (tS - c)) V
    for start in range(0, lk, block_n):
        stop = min(start + block_n, lk)
        k_blk, tk_blk = kf[..., start:stop, :], tkf[..., start:stop, :]
        scores = qf @ k_blk.transpose(-2, -1)                           # raw, unscaled
        t_raw = tqf @ k_blk.transpose(-2, -1) + qf @ tk_blk.transpose(-2, -1)
        if is_causal:
            keep = _causal_keep(0, lq, lk, q.device)[:, start:stop]
            scores = scores.masked_fill(~keep, float("-inf"))
        m_blk = scores.amax(-1) * (s * LOG2E)
        grow = m_blk - m_i > slack
        if block_m:  # any row of a tile of block_m rows moves the whole tile
            tiles = -(-lq // block_m)
            grow = torch.nn.functional.pad(grow, (0, tiles * block_m - lq))
            grow = grow.view(*lead, tiles, block_m).any(-1).repeat_interleave(block_m, -1)[..., :lq]
        m_new = torch.where(grow, torch.maximum(m_i, m_blk), m_i)
        alpha = torch.exp2(m_i - m_new)
        p = torch.exp2(scores * (s * LOG2E) - m_new[..., None])
        l_i = l_i * alpha + p.sum(-1)
        r_i = r_i * alpha + (p * t_raw).sum(-1) * s
        c_new = r_i / l_i if centre else c_i
        v_blk = v[..., start:stop, :].float()
        tv_blk = tv[..., start:stop, :].float()
        p_op = p.to(operand).float()
        centred = (p * (t_raw * s - c_new[..., None])).to(operand).float()
        acc_t = acc_t * alpha[..., None] + (c_i - c_new)[..., None] * (acc_o * alpha[..., None])
        acc_t = acc_t + p_op @ tv_blk + centred @ v_blk
        acc_o = acc_o * alpha[..., None] + p_op @ v_blk
        m_i, c_i = m_new, c_new
    out = acc_o / l_i[..., None]
    t_out = acc_t / l_i[..., None]
    if not centre:
        t_out = t_out - (r_i / l_i)[..., None] * out
    lse = (m_i + torch.log2(l_i)) / LOG2E
    return out.to(q.dtype), t_out.to(q.dtype), lse


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (tight tests), float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_backward(q, k, v, grad_out, is_causal: bool = False, scale: float | None = None, *,
                       chunk_size: int | None = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of O = softmax(s Q K^T) V by recomputation, chunked over queries."""
    s = default_scale(q, scale)
    acc = _accumulation_dtype(q)
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for start, stop in _chunks(q.shape[-2], chunk_size):
        qc, go = q[..., start:stop, :].to(acc), grad_out[..., start:stop, :].to(acc)
        scores = (qc @ kf.transpose(-2, -1)) * s
        if is_causal:
            scores = scores.masked_fill(~_causal_keep(start, stop, k.shape[-2], q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        dv += probs.transpose(-2, -1) @ go
        d_probs = go @ vf.transpose(-2, -1)
        d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        dq[..., start:stop, :] = (d_scores @ kf) * s
        dk += (d_scores.transpose(-2, -1) @ qc) * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def jvp_attention_backward(q, k, v, tq, tk, tv, grad_out, grad_t_out, is_causal: bool = False,
                           scale: float | None = None, *, chunk_size: int | None = 1024):
    """Gradients of (O, tO) w.r.t. (Q, K, V, tQ, tK, tV) given (dO, dtO), chunked over queries.

    Chain rule through the module docstring's formulas, per query chunk (w = rowsum(dtP * P)):
        dtP = dtO V^T                   dtS = P * (dtP - w)
        dP  = dO V^T + dtO tV^T + dtP * (tS - mu) - w * tS
        dS  = P * (dP - rowsum(P * dP))
        dV  = P^T dO + tP^T dtO         dtV = P^T dtO
        dQ  = s (dS K + dtS tK)         dK  = s (dS^T Q + dtS^T tQ)
        dtQ = s dtS K                   dtK = s dtS^T Q
    """
    s = default_scale(q, scale)
    acc = _accumulation_dtype(q)
    kf, vf, tkf, tvf = (t.to(acc) for t in (k, v, tk, tv))
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dtq = torch.empty_like(dq)
    dk, dv, dtk, dtv = (torch.zeros_like(t) for t in (kf, vf, tkf, tvf))
    for start, stop in _chunks(q.shape[-2], chunk_size):
        qc, tqc = q[..., start:stop, :].to(acc), tq[..., start:stop, :].to(acc)
        go, gto = grad_out[..., start:stop, :].to(acc), grad_t_out[..., start:stop, :].to(acc)
        scores = (qc @ kf.transpose(-2, -1)) * s
        if is_causal:
            scores = scores.masked_fill(~_causal_keep(start, stop, k.shape[-2], q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        t_scores = (tqc @ kf.transpose(-2, -1) + qc @ tkf.transpose(-2, -1)) * s
        mu = (probs * t_scores).sum(-1, keepdim=True)
        centered = t_scores - mu
        t_probs = probs * centered
        probs_t = probs.transpose(-2, -1)
        dv += probs_t @ go + t_probs.transpose(-2, -1) @ gto
        dtv += probs_t @ gto
        d_t_probs = gto @ vf.transpose(-2, -1)
        w = (d_t_probs * probs).sum(-1, keepdim=True)
        d_t_scores = probs * (d_t_probs - w)
        d_probs = go @ vf.transpose(-2, -1) + gto @ tvf.transpose(-2, -1) + d_t_probs * centered - w * t_scores
        d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        dq[..., start:stop, :] = (d_scores @ kf + d_t_scores @ tkf) * s
        dtq[..., start:stop, :] = (d_t_scores @ kf) * s
        dk += (d_scores.transpose(-2, -1) @ qc + d_t_scores.transpose(-2, -1) @ tqc) * s
        dtk += (d_t_scores.transpose(-2, -1) @ qc) * s
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            dtq.to(tq.dtype), dtk.to(tk.dtype), dtv.to(tv.dtype))


def stock_math_jvp(q, k, v, tq, tk, tv, is_causal: bool = False):
    """The stock-PyTorch baseline: torch.func.jvp through SDPA's math kernel (the flash kernel has no
    forward AD). Materialises the L x L scores; used as the error and speed yardstick."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(q_, k_, v_):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=is_causal)

    return torch.func.jvp(attention, (q, k, v), (tq, tk, tv))

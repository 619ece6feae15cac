"""The PyTorch twin of the SageAttention2 kernels: the oracle for the Triton code and the CPU path.

Every step mirrors ``triton.py`` in the same order, so the two differ only by floating-point rounding
(fused multiply-adds, exp2 approximations, tensor-core accumulation order):

1. quantize (``quantize_q``, ``quantize_k``, ``quantize_v``):
   - Q is multiplied by ``sm_scale * log2(e)`` first (the softmax scale folded into the Q scale, so the
     kernel uses exp2), optionally smoothed (minus its mean over each 128-token block; the removed part
     comes back as ``delta_s = mean_q @ K'^T``), then INT8 with one absmax/127 scale per group;
   - K minus its per-channel mean over all tokens (exact for softmax: each score row shifts by a
     constant), then INT8 per group; never in place on the caller's tensor;
   - V optionally minus its per-channel mean (added back to the output; exact because each row of
     the softmax sums to one), then FP8 E4M3 (or FP16 with ``pv_dtype='fp16'``) with one scale per channel,
   ``max_tokens |V[:, c]| / v_scale_max``, times (``v_block_scale``, default) one factor per 128-key block,
   that block's own range; every quantizer multiplies by the reciprocal of its scale;
   - the K and V means and V's channel scale come from all tokens, or (``stats_chunks``, default 8) from at
     most that many evenly spaced 128-token chunks: any centre keeps the smoothing exact;
   INT8 rounding is half away from zero, as in the official code.
2. attend (``attend_quantized``): FlashAttention-style loop over KV blocks of ``block_n`` keys, online
   softmax in base 2, ``P~ = exp2(s - m) * 448`` cast to FP8 E4M3 or FP16 (static scale: P~ <= 1 needs no max),
   PV per KV block into a fresh accumulator added into FP32 (two-level), or the ablations.

Shapes: [B, H, L, D] tensors; scales are expanded to one per token ([B, H, L], float32), so one kernel
serves every granularity.
"""

from __future__ import annotations

import math

import torch

from .config import FP8_E4M3_MAX, P_SCALE, SageConfig

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2_P_SCALE = math.log2(P_SCALE)
INT8_MAX = 127.0
SCALE_FLOOR = 1e-12          # an all-zero group gets a tiny scale instead of 0/0
Q_SMOOTH_BLOCK = 128         # tokens per Q mean (SageAttention3's group size; a multiple of block_m)
STATS_CHUNK = 128            # tokens per statistics chunk (the K/V means may come from a sample of chunks)
V_BLOCK = 128                # keys per V scale factor (v_block_scale); a multiple of every block_n
SINGLE_LEVEL_MANTISSA_BITS = 13  # emulated precision of Hopper's running FP8-MMA accumulator (see attend_quantized)
MMA_K = 32                   # keys per FP8 MMA instruction step (m64nNk32 on sm90)

_QK_GROUP = {  # granularity -> (Q group rule, K group rule)
    "per_block": (("contiguous", 128), ("contiguous", 64)),
    "per_warp": (("contiguous", 16), ("contiguous", 128)),
    "per_thread": (("thread_q", 16), ("thread_k", 128)),
    "per_token": (("contiguous", 1), ("contiguous", 1)),
}


def group_index(n_tokens: int, rule: tuple[str, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Scale-group id of every token (int64 [n_tokens]) for a rule from ``_QK_GROUP``.

    thread_q: rows r and r+8 of each 16-row warp tile share a scale (an m16n8 MMA thread holds rows
    lane/4 and lane/4+8); thread_k: inside a 128-key block, keys with equal (row mod 8) div 2 share one
    (a thread holds key columns 2*(lane%4) and +1 of every 8).
    """
    t = torch.arange(n_tokens, device=device)
    kind, size = rule
    if kind == "contiguous":
        return t // size
    if kind == "thread_q":
        return (t // 16) * 8 + t % 8
    if kind == "thread_k":
        return (t // 128) * 4 + (t % 8) // 2
    raise ValueError(f"unknown group rule {rule!r}")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """trunc(x + 0.5 sign(x)): the official quantizers' rounding, half away from zero."""
    return torch.trunc(torch.where(x >= 0, x + 0.5, x - 0.5))


def int8_by_groups(x: torch.Tensor, gid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 of float32 ``x`` [..., L, D] with one absmax/127 scale per token group.

    Returns (int8 values [..., L, D], float32 scale per token [..., L]).
    """
    amax_token = x.abs().amax(dim=-1)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    idx = gid.expand_as(amax_token)
    amax_group = torch.zeros(*amax_token.shape[:-1], n_groups, dtype=torch.float32, device=x.device)
    amax_group = amax_group.scatter_reduce(-1, idx, amax_token, reduce="amax", include_self=True)
    scale_group = amax_group.clamp_min(SCALE_FLOOR) / INT8_MAX
    scale = torch.gather(scale_group, -1, idx)
    # multiply by the correctly rounded reciprocal (the kernels do the same: one division per token, not
    # per element); it differs from x / scale by at most one float32 rounding before the INT8 rounding
    q = round_half_away(x * torch.reciprocal(scale).unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def fp32_scalar(value: float, device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 scalar (a 0-d CPU tensor, which CUDA ops take without a copy or a sync), so products
    round like the kernel's float32 argument."""
    return torch.tensor(value, dtype=torch.float32)


def quantize_q(q: torch.Tensor, sm_scale: float, granularity: str, smooth: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q [B, H, Lq, D] -> (int8, per-token scale, mean of each 128-token block [B, H, nb, D] or None).

    The softmax scale times log2(e) is applied before quantizing, so the kernel's scores are in base 2.
    """
    qf = q.float() * fp32_scalar(sm_scale * LOG2E, q.device)
    mean = None
    if smooth:
        lq = q.shape[-2]
        n_blocks = -(-lq // Q_SMOOTH_BLOCK)
        block_of = torch.arange(lq, device=q.device) // Q_SMOOTH_BLOCK
        sums = torch.zeros(*qf.shape[:-2], n_blocks, qf.shape[-1], dtype=torch.float32, device=q.device)
        sums = sums.index_add(-2, block_of, qf)
        counts = torch.bincount(block_of, minlength=n_blocks).to(torch.float32)
        mean = sums / counts[:, None]
        qf = qf - mean.index_select(-2, block_of)
    gid = group_index(q.shape[-2], _QK_GROUP[granularity][0], q.device)
    q8, scale = int8_by_groups(qf, gid)
    return q8, scale, mean


def stats_chunks(n_tokens: int, max_chunks: int) -> tuple[int, int]:
    """(chunks sampled, stride): at most ``max_chunks`` (0: all) evenly spaced chunks of STATS_CHUNK tokens,
    chunk i * stride for i < count. When not all chunks are taken, the last (maybe ragged) one never is."""
    n_chunks = -(-n_tokens // STATS_CHUNK)
    count = n_chunks if max_chunks == 0 else min(max_chunks, n_chunks)
    return count, n_chunks // count


def stats_tokens(n_tokens: int, max_chunks: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Indices of the tokens the K/V statistics read (None: all of them), see ``stats_chunks``."""
    count, stride = stats_chunks(n_tokens, max_chunks)
    if stride == 1 and count * STATS_CHUNK >= n_tokens:
        return None
    starts = torch.arange(count, device=device) * (stride * STATS_CHUNK)
    return (starts[:, None] + torch.arange(STATS_CHUNK, device=device)).reshape(-1)


def _sampled(x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    return x if tokens is None else x.index_select(-2, tokens)


def key_mean(k: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean of K over its tokens (or over ``tokens`` only), float32 [B, Hk, 1, D]."""
    return _sampled(k.float(), tokens).mean(dim=-2, keepdim=True)


def quantize_k(k: torch.Tensor, granularity: str, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K [B, Hk, Lk, D] minus ``mean`` (a new tensor; the caller's K is untouched) -> (int8, per-token scale)."""
    kf = k.float()
    if mean is not None:
        kf = kf - mean
    gid = group_index(k.shape[-2], _QK_GROUP[granularity][1], k.device)
    return int8_by_groups(kf, gid)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even cast to FP8 E4M3 (values are within +-448 by construction)."""
    return x.to(torch.float8_e4m3fn)


def value_mean(v: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean of V over its tokens (or over ``tokens`` only), float32 [B, Hk, 1, D]."""
    return _sampled(v.float(), tokens).mean(dim=-2, keepdim=True)


def quantize_v(v: torch.Tensor, v_scale_max: float, mean: torch.Tensor | None = None, pv_dtype: str = "fp8", *,
               tokens: torch.Tensor | None = None, block_scale: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """V [B, Hk, Lk, D] (minus ``mean`` if given) -> (FP8 E4M3 or FP16 values, float32 scale per channel [B, Hk, D],
    float32 factor per V_BLOCK keys [B, Hk, ceil(Lk / V_BLOCK)] or None).

    The channel scale maps the largest magnitude over ``tokens`` (all if None) to ``v_scale_max``. With
    ``block_scale`` each block of V_BLOCK keys is then divided by its own factor, its largest scaled magnitude
    over ``v_scale_max`` (so no value exceeds the range whatever the sample missed); the block's scale of channel
    c is scale[c] * factor[block]. Values are multiplied by correctly rounded reciprocals (as the kernel does)."""
    vf = v.float()
    if mean is not None:
        vf = vf - mean
    v_max = fp32_scalar(v_scale_max, v.device)
    scale = _sampled(vf, tokens).abs().amax(dim=-2).clamp_min(SCALE_FLOOR) / v_max
    scaled = vf * torch.reciprocal(scale).unsqueeze(-2)
    factor = None
    if block_scale:
        lk = v.shape[-2]
        n_blocks = -(-lk // V_BLOCK)
        padded = torch.nn.functional.pad(scaled, (0, 0, 0, n_blocks * V_BLOCK - lk))
        blocks = padded.reshape(*scaled.shape[:-2], n_blocks, V_BLOCK, scaled.shape[-1])
        factor = blocks.abs().amax(dim=(-1, -2)).clamp_min(SCALE_FLOOR) / v_max
        per_key = torch.reciprocal(factor).repeat_interleave(V_BLOCK, dim=-1)[..., :lk]
        scaled = scaled * per_key.unsqueeze(-1)
    return (to_e4m3(scaled) if pv_dtype == "fp8" else scaled.to(torch.float16)), scale, factor


def round_p(p: torch.Tensor, pv_dtype: str) -> torch.Tensor:
    """P~ (float32, in [0, 448]) rounded to the PV operand format, back in float32."""
    return (to_e4m3(p) if pv_dtype == "fp8" else p.to(torch.float16)).float()


def mma_step_truncated(acc: torch.Tensor, p8: torch.Tensor, v8: torch.Tensor, bits: int) -> torch.Tensor:
    """acc + p8 @ v8 as Hopper's FP8 MMA adds into a running accumulator (an emulation).

    The tensor core aligns every product to the largest exponent among the products and the
    accumulator, and keeps about ``bits`` bits below it: each product is cut toward zero to that grid,
    so products far smaller than a grown accumulator vanish. p8 [..., M, K], v8 [..., K, N].
    """
    products = p8.unsqueeze(-1) * v8.unsqueeze(-3)                          # [..., M, K, N]
    largest = torch.maximum(acc.abs(), products.abs().amax(dim=-2))         # [..., M, N]
    ulp = torch.exp2(torch.floor(torch.log2(largest.clamp_min(1e-30))) - bits).unsqueeze(-2)
    return acc + (torch.trunc(products / ulp) * ulp).sum(dim=-2)


def attend_quantized(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                     v8: torch.Tensor, v_scale: torch.Tensor, delta_s: torch.Tensor | None,
                     v_mean: torch.Tensor | None = None, v_factor: torch.Tensor | None = None, *,
                     is_causal: bool, config: SageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention loop on quantized inputs (all with H query heads, [B, H, L, D]).

    Returns (output float32 [B, H, Lq, D], base-2 log-sum-exp of the smoothed base-2 scores [B, H, Lq]).
    ``delta_s`` [B, H, ceil(Lq/128), Lk] is the Q-smoothing correction, added to the scores; ``v_mean``
    [B, H, 1, D] the V-smoothing mean, added to the output. ``v_factor`` [B, H, ceil(Lk/V_BLOCK)] is V's
    per-block scale factor: the accumulator is kept in units of the current block's factor (the previous
    block's factor times this one's reciprocal multiplies alpha, a per-row number), and the last factor multiplies 1/l,
    so no per-element work is added.

    ``pv_accumulation='fp32'`` emulates Hopper's running FP8-MMA accumulator (``mma_step_truncated``:
    products aligned to the accumulator and cut to about 13 bits, so small products vanish once the
    accumulator has grown). The two-level modes add each KV block's own product in exact FP32 (the
    fresh accumulator starts from zero, so little is cut); 'fp32+fp16' rounds each block's sum to FP16.
    """
    lq, lk = q8.shape[-2], k8.shape[-2]
    block_n = config.block_n
    qf = q8.float()
    qs = q_scale.unsqueeze(-1)                                   # [B, H, Lq, 1]
    rows = torch.arange(lq, device=q8.device)
    m = torch.full((*q8.shape[:-1],), float("-inf"), device=q8.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(*q8.shape[:-1], v8.shape[-1], device=q8.device)
    if delta_s is not None:
        delta_rows = delta_s.index_select(-2, rows // Q_SMOOTH_BLOCK)   # [B, H, Lq, Lk]
    n_end = min(lk, lq) if is_causal else lk                     # top-left causal: row i sees keys <= i
    r_prev = v_factor[..., 0] if v_factor is not None else None   # the accumulator's unit (first block's factor)
    for start in range(0, n_end, block_n):
        stop = min(start + block_n, lk)
        cols = torch.arange(start, stop, device=q8.device)
        s_int = qf @ k8[..., start:stop, :].float().transpose(-1, -2)   # exact: |sum| < 2^24
        t = s_int * k_scale[..., None, start:stop]
        if is_causal and stop - 1 > rows.min():
            t = t.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        if delta_s is None:
            m_block = t.amax(dim=-1) * q_scale
            m_new = torch.maximum(m, m_block)
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            arg = t * qs - (m_safe - LOG2_P_SCALE).unsqueeze(-1)
        else:
            s = t * qs + delta_rows[..., start:stop]
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            arg = s - (m_safe - LOG2_P_SCALE).unsqueeze(-1)
        if config.exp2_fp16:  # the kernel's ex2.approx.f16x2: argument and result rounded to FP16
            p = torch.exp2(arg.to(torch.float16).float()).to(torch.float16).float()
        else:
            p = torch.exp2(arg)
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(dim=-1)
        alpha_acc = alpha
        if v_factor is not None:
            r = v_factor[..., start // V_BLOCK]
            alpha_acc = alpha * (r_prev * torch.reciprocal(r)).unsqueeze(-1)   # the kernel loads 1/r
            r_prev = r
        p8 = round_p(p, config.pv_dtype)
        vb = v8[..., start:stop, :].float()
        if config.pv_accumulation == "fp32+fp32" or (config.pv_accumulation == "fp32" and config.pv_dtype == "fp16"):
            # (FP16 MMAs accumulate in full FP32, so a running accumulator loses nothing there)
            acc = acc * alpha_acc.unsqueeze(-1) + p8 @ vb
        elif config.pv_accumulation == "fp32+fp16":
            acc = acc * alpha_acc.unsqueeze(-1) + (p8 @ vb).to(torch.float16).float()
        else:  # FP8, single running accumulator, emulating the tensor core's reduced precision
            acc = acc * alpha_acc.unsqueeze(-1)
            for k0 in range(0, stop - start, MMA_K):
                acc = mma_step_truncated(acc, p8[..., k0:k0 + MMA_K], vb[..., k0:k0 + MMA_K, :],
                                         SINGLE_LEVEL_MANTISSA_BITS)
        m = m_safe
    inv_l = 1.0 / l
    if v_factor is not None:
        inv_l = inv_l * r_prev.unsqueeze(-1)
    out = acc * inv_l.unsqueeze(-1) * v_scale.unsqueeze(-2)
    if v_mean is not None:
        out = out + v_mean
    lse2 = m + torch.log2(l) - LOG2_P_SCALE
    return out, lse2


def expand_kv_heads(t: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Repeat KV heads (dim 1) for GQA/MQA: query head h reads KV head h // (Hq / Hk)."""
    if t.shape[1] == n_q_heads:
        return t
    return t.repeat_interleave(n_q_heads // t.shape[1], dim=1)


def sage_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                             scale: float | None = None, config: SageConfig | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """SageAttention2 on [B, H, L, D] inputs with the PyTorch twin. Returns (out in q's dtype, natural LSE).

    Inputs are validated by the public function (``fewer.attention.sage.sage_attention``).
    """
    config = config or SageConfig()
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    hq = q.shape[1]
    q8, qs, q_mean = quantize_q(q, sm_scale, config.qk_granularity, config.smooth_q)
    tokens = stats_tokens(k.shape[-2], config.stats_chunks, k.device)
    k_mean = key_mean(k, tokens) if config.smooth_k else None
    k8, ks = quantize_k(k, config.qk_granularity, k_mean)
    v_mean = value_mean(v, tokens) if config.smooth_v else None
    v8, vs, vf = quantize_v(v, config.resolved_v_scale_max, v_mean, config.pv_dtype, tokens=tokens,
                            block_scale=config.v_block_scale)
    delta_s = None
    if q_mean is not None:
        delta_s = q_mean @ expand_kv_heads(smoothed_keys(k, k_mean), hq).transpose(-1, -2)
    out, lse2 = attend_quantized(q8, qs, expand_kv_heads(k8, hq), expand_kv_heads(ks, hq),
                                 expand_kv_heads(v8, hq), expand_kv_heads(vs, hq), delta_s,
                                 expand_kv_heads(v_mean, hq) if v_mean is not None else None,
                                 expand_kv_heads(vf, hq) if vf is not None else None,
                                 is_causal=is_causal, config=config)
    return out.to(q.dtype), natural_lse(lse2, q, k_mean, sm_scale)


def smoothed_keys(k: torch.Tensor, k_mean: torch.Tensor | None) -> torch.Tensor:
    """K - mean in float32 (a new tensor), the keys the INT8 scores approximate."""
    return k.float() - k_mean if k_mean is not None else k.float()


def natural_lse(lse2: torch.Tensor, q: torch.Tensor, k_mean: torch.Tensor | None, sm_scale: float) -> torch.Tensor:
    """Base-2 LSE of the smoothed scores -> natural LSE of the true scores.

    K smoothing shifted row i's scores by -sm_scale * q_i . mean(K); adding it back gives torch's LSE.
    """
    lse = lse2 * LN2
    if k_mean is not None:
        hq = q.shape[1]
        correction = (q.float() @ expand_kv_heads(k_mean, hq).transpose(-1, -2)).squeeze(-1) * sm_scale
        lse = lse + correction
    return lse


__all__ = ["FP8_E4M3_MAX", "LOG2E", "attend_quantized", "group_index", "int8_by_groups", "key_mean",
           "natural_lse", "quantize_k", "quantize_q", "quantize_v", "round_half_away", "round_p", "sage_attention_reference",
           "stats_chunks", "stats_tokens", "value_mean"]

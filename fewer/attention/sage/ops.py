"""torch.library registration of SageAttention2, so torch.compile traces it without graph breaks.

``fewer::sage_attention`` takes q, k, v in [B, H, L, D] or [B, L, H, D] (``layout``), the config as plain
scalars, and returns (out in q's layout and dtype, natural log-sum-exp [B, H, Lq] float32). Its fake
implementation only allocates. It is forward-only: the registered backward raises, because the
quantized kernel has no gradient (the official package silently cuts it instead).
"""

from __future__ import annotations

import functools
import math

import torch

from ...core.backend import BackendUnavailable
from ...core.capability import can_run_triton, triton_interpreter_on
from .config import SageConfig
from .reference import natural_lse, sage_attention_reference

LAYOUTS = ("bhld", "blhd")


def _to_bhld(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhld" else t.transpose(1, 2)


@functools.lru_cache(maxsize=64)  # building and validating a config costs more than a short kernel
def _config_from(qk_granularity: str, smooth_k: bool, smooth_q: bool, smooth_v: bool, pv_accumulation: str,
                 pv_dtype: str, v_scale_max: float, exp2_fp16: bool, block_m: int, block_n: int,
                 v_block_scale: bool, stats_chunks: int, kernel: str) -> SageConfig:
    return SageConfig(qk_granularity=qk_granularity, smooth_k=smooth_k, smooth_q=smooth_q, smooth_v=smooth_v,
                      pv_accumulation=pv_accumulation, pv_dtype=pv_dtype,
                      v_scale_max=v_scale_max if v_scale_max > 0 else None,
                      exp2_fp16=exp2_fp16, block_m=block_m, block_n=block_n, v_block_scale=v_block_scale,
                      stats_chunks=stats_chunks, kernel=kernel)


def resolve_kernel(config: SageConfig, device: torch.device) -> str:
    """'triton' or 'torch' for these inputs; an explicit choice that cannot run raises with the reason."""
    return _resolve_kernel(config.kernel, device.type, triton_interpreter_on())


@functools.lru_cache(maxsize=16)
def _resolve_kernel(kernel: str, device_type: str, interpreter: bool) -> str:
    if kernel == "torch" or (kernel == "auto" and device_type != "cuda"):
        return "torch"
    ok, reason = can_run_triton(device_type)
    if not ok:
        what = "SageConfig.kernel='triton' cannot run here" if kernel == "triton" else \
            "sage attention on CUDA needs Triton"
        raise BackendUnavailable(f"{what}: {reason}")
    return "triton"


@torch.library.custom_op("fewer::sage_attention", mutates_args=())
def sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, sm_scale: float,
                      layout: str, return_lse: bool, qk_granularity: str, smooth_k: bool, smooth_q: bool,
                      smooth_v: bool, pv_accumulation: str, pv_dtype: str, v_scale_max: float, exp2_fp16: bool,
                      block_m: int, block_n: int, v_block_scale: bool, stats_chunks: int,
                      kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config_from(qk_granularity, smooth_k, smooth_q, smooth_v, pv_accumulation, pv_dtype, v_scale_max,
                          exp2_fp16, block_m, block_n, v_block_scale, stats_chunks, kernel)
    qb, kb, vb = (_to_bhld(t, layout) for t in (q, k, v))
    if resolve_kernel(config, q.device) == "torch":
        out, lse = sage_attention_reference(qb, kb, vb, is_causal=is_causal, scale=sm_scale, config=config)
        out = out if layout == "bhld" else out.transpose(1, 2)
        return out.contiguous(), lse if return_lse else lse.new_empty(0)
    from .triton import sage_attention_triton

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2, k_mean = sage_attention_triton(qb, kb, vb, _to_bhld(out, layout), is_causal=is_causal,
                                         sm_scale=sm_scale, config=config)
    if not return_lse:  # the LSE correction reads all of Q once more; skip it unless asked
        return out, lse2.new_empty(0)
    if k_mean is not None:
        d = q.shape[-1]
        k_mean = k_mean[:, :d].reshape(kb.shape[0], kb.shape[1], 1, d)
    return out, natural_lse(lse2, qb, k_mean, sm_scale)


@sage_attention_op.register_fake
def _(q, k, v, is_causal, sm_scale, layout, return_lse, qk_granularity, smooth_k, smooth_q, smooth_v,
      pv_accumulation, pv_dtype, v_scale_max, exp2_fp16, block_m, block_n, v_block_scale, stats_chunks, kernel):
    qb = _to_bhld(q, layout)
    lse_shape = (qb.shape[0], qb.shape[1], qb.shape[2]) if return_lse else (0,)
    lse = q.new_empty(lse_shape, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        "sage attention is forward-only (INT8/FP8 quantized inference kernel, no gradient); "
        "use backend='torch' (or exclude this layer from the patch) where gradients are needed")


sage_attention_op.register_autograd(_backward, setup_context=_setup_context)


def call_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float | None,
            layout: str, config: SageConfig, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the op; the LSE is an empty tensor unless ``return_lse``."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return sage_attention_op(q, k, v, bool(is_causal), sm_scale, layout, bool(return_lse), config.qk_granularity,
                             config.smooth_k, config.smooth_q, config.smooth_v, config.pv_accumulation,
                             config.pv_dtype, float(config.v_scale_max) if config.v_scale_max is not None else 0.0,
                             config.exp2_fp16, config.block_m, config.block_n, config.v_block_scale,
                             config.stats_chunks, config.kernel)

"""SageAttention2 / 2++: INT8 QK^T and FP8 PV attention, a drop-in for scaled_dot_product_attention.

    from fewer.attention.sage import sage_attention, SageConfig
    out = sage_attention(q, k, v, is_causal=True)                       # [B, H, L, D], fp16/bf16
    out = fewer.attention.sdpa(q, k, v, backend="sage", config=SageConfig.from_preset("sage2pp"))

On CUDA it runs the Triton kernels (``triton.py``); on CPU the PyTorch twin (``reference.py``), which
is also the kernels' oracle. ``SageConfig`` chooses the INT8 scale granularity, K/Q smoothing and the
PV accumulation. Inputs it cannot take raise: attn_mask, dropout_p > 0, dtypes other than fp16/bf16,
head dims above 256, devices other than CUDA/CPU. Forward only.
"""

from __future__ import annotations

import functools

import torch

from ...core.capability import Capability, can_run_triton, has_cuda, supports_fp8
from ..dispatch import register_backend
from .config import DEFAULT_CONFIG, GRANULARITIES, PV_ACCUMULATIONS, SageConfig
from .ops import LAYOUTS, call_op
from .reference import sage_attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _resolve_config(config: SageConfig | str | None) -> SageConfig:
    if config is None:
        return DEFAULT_CONFIG
    if isinstance(config, str):
        return SageConfig.from_preset(config)
    if not isinstance(config, SageConfig):
        raise ValueError(f"sage attention takes a SageConfig or a preset name {SageConfig.presets()}; "
                         f"got {type(config).__name__}")
    return config


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                 dropout_p: float, enable_gqa: bool, layout: str) -> None:
    """Raise ValueError/NotImplementedError naming the limit for anything sage attention cannot take."""
    if attn_mask is not None:
        raise NotImplementedError(
            "sage attention takes no attn_mask (it would be ignored otherwise); use is_causal=True for causal "
            "masking, or the 'torch' backend for arbitrary masks")
    if dropout_p != 0.0:
        raise NotImplementedError(f"sage attention has no dropout: dropout_p must be 0.0, got {dropout_p}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: choose 'bhld' ([B, H, L, D]) or 'blhd' ([B, L, H, D])")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"sage attention needs 4-D {name} ({layout}); got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"sage attention supports float16 and bfloat16 inputs; {name} is {t.dtype}")
        if t.device.type not in ("cuda", "cpu"):
            raise ValueError(f"sage attention runs on CUDA (Triton) or CPU (PyTorch twin); {name} is on {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device; got {q.device}, {k.device}, {v.device}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"sage attention needs one head dim for q, k and v; got {head_dim}, {k.shape[-1]}, "
                         f"{v.shape[-1]}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"sage attention supports head dims up to {MAX_HEAD_DIM} (others are padded to a power "
                         f"of two >= 32); got {head_dim}")
    h_axis, l_axis = (1, 2) if layout == "bhld" else (2, 1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[l_axis] != v.shape[l_axis] or k.shape[h_axis] != v.shape[h_axis]:
        raise ValueError(f"key and value shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[l_axis] == 0 or q.shape[l_axis] == 0:
        raise ValueError("sage attention needs at least one query and one key")
    hq, hk = q.shape[h_axis], k.shape[h_axis]
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"query has {hq} heads but key has {hk}: pass enable_gqa=True for GQA/MQA")
        if hq % hk:
            raise ValueError(f"GQA needs query heads ({hq}) divisible by key heads ({hk})")


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, *, config: SageConfig | str | None = None, layout: str = "bhld",
                   return_lse: bool = False):
    """SageAttention2: softmax(Q K^T * scale) V with INT8 Q/K and FP8 P/V.

    ``layout`` 'bhld' ([B, H, L, D], torch's) or 'blhd' ([B, L, H, D]); the output has q's layout and dtype.
    Causal masking is top-left aligned like torch's SDPA. ``return_lse=True`` also returns the natural
    log-sum-exp of the scores, [B, H, Lq] float32.
    """
    check_inputs(q, k, v, attn_mask, dropout_p, enable_gqa, layout)
    cfg = _resolve_config(config)
    out, lse = call_op(q, k, v, is_causal=is_causal, scale=scale, layout=layout, config=cfg, return_lse=return_lse)
    return (out, lse) if return_lse else out


def _backend_fn(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    return sage_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config=config)


def backend_check(query: torch.Tensor) -> Capability:
    """Can the sage backend run on this query's device? CPU runs the PyTorch twin."""
    return _device_check(query.device.type, query.device.index)


@functools.lru_cache(maxsize=16)  # the answer per device does not change within a process
def _device_check(device_type: str, _index: int | None) -> Capability:
    if device_type == "cpu":
        return Capability(True, "PyTorch twin on CPU")
    if device_type != "cuda":
        return Capability(False, f"sage attention runs on CUDA or CPU, not {device_type}")
    for check in (has_cuda(), can_run_triton(device_type), supports_fp8()):
        if not check:
            return Capability(False, check.reason + " (sage attention needs Triton and FP8 tensor cores, sm89+)")
    return Capability(True, "Triton INT8/FP8 kernels")


register_backend("sage", _backend_fn, backend_check,
                 description="SageAttention2: INT8 QK^T (smoothed K), FP8 PV, two-level accumulation")

__all__ = ["GRANULARITIES", "PV_ACCUMULATIONS", "SageConfig", "backend_check", "check_inputs", "sage_attention",
           "sage_attention_reference"]

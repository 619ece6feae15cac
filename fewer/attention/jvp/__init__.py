"""JVP (forward-mode) attention: O and its tangent tO in one FlashAttention-style pass.

    from fewer.attention.jvp import jvp_attention, attention
    out, t_out = jvp_attention(q, k, v, tq, tk, tv, is_causal=False)     # [B, H, L, D]
    out, t_out = torch.func.jvp(lambda q, k, v: attention(q, k, v), (q, k, v), (tq, tk, tv))

Importing this package registers the attention backend ``"jvp"``: any model that calls
``fewer.attention.sdpa(..., backend="jvp")`` or runs inside ``fewer.attention.use_backend("jvp")``
supports torch.func.jvp, forward_ad, backward, and backward through the tangent. On CUDA it runs
the Triton kernel; elsewhere the PyTorch reference (config ``JvpAttentionConfig(kernel=...)``
overrides). See README.md in this folder.
"""

from __future__ import annotations

import torch

from ...core.capability import Capability
from ..dispatch import register_backend
from .config import JvpAttentionConfig
from .ops import MAX_HEAD_DIM, attention, jvp_attention
from .reference import (attention_backward, attention_reference, jvp_attention_backward,
                        jvp_attention_blockwise, jvp_attention_exact)

__all__ = ["JvpAttentionConfig", "MAX_HEAD_DIM", "attention", "attention_backward", "attention_reference",
           "jvp_attention", "jvp_attention_backward", "jvp_attention_blockwise", "jvp_attention_exact",
           "sdpa_jvp_backend"]


def sdpa_jvp_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """The ``jvp`` backend of ``fewer.attention.sdpa``: causal or full attention, no mask, no dropout."""
    if config is None:
        config = JvpAttentionConfig()
    if not isinstance(config, JvpAttentionConfig):
        raise ValueError(f"the jvp backend takes a JvpAttentionConfig or None; got {type(config).__name__}")
    if attn_mask is not None:
        raise NotImplementedError("the jvp attention backend takes no attn_mask (boolean or additive); "
                                  "it supports full attention and is_causal=True only")
    if dropout_p != 0.0:
        raise NotImplementedError(f"the jvp attention backend has no dropout; got dropout_p={dropout_p}, pass 0.0")
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        # Repeat the shared key/value heads (ordinary ops, so every autodiff mode sees through it).
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    return attention(q, k, v, is_causal=is_causal, scale=scale, backend=config.kernel,
                     backward_chunk=config.backward_chunk)


def _check(query: torch.Tensor) -> Capability:
    return Capability(True, "Triton kernel on CUDA, PyTorch reference elsewhere")


register_backend("jvp", sdpa_jvp_backend, _check,
                 description="attention with forward-mode AD (fused JVP kernel on CUDA) and double backward")

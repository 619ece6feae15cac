"""Sparse-Linear Attention (SLA, arXiv 2509.24006): block-sparse softmax attention on the critical
blocks plus projected linear attention on the marginal ones, fused in one Triton kernel per pass.

    from fewer.attention.sla import SLAConfig, SparseLinearAttention, convert_to_sla_
    attn = SparseLinearAttention(head_dim=64, config=SLAConfig(topk=0.05))
    out = attn(q, k, v)                                   # [B, H, L, D]
    fewer.attention.sdpa(q, k, v, backend="sla", config=attn)   # same, through the dispatcher
    convert_to_sla_(dit, SLAConfig.from_preset("paper"))  # every DiT attention layer -> SLA

The "sla" backend of ``fewer.attention.sdpa`` takes ``config=`` as an SLAConfig (the projection is
then the zero map, i.e. SLA at initialisation) or a SparseLinearAttention module (its projection).
"""

from __future__ import annotations

import torch

from ...core import Capability
from ..dispatch import register_backend
from .config import SLAConfig
from .module import (SparseLinearAttention, convert_attention_, convert_to_sla_, projection_parameters,
                     route_torch_sdpa, sla_modules, sparse_linear_attention)
from .ops import sla_parts
from .reference import (BlockPlan, compressed_attention_map, density, linear_only_reference, plan_blocks,
                        sparse_linear_attention_reference, sparse_only_reference)

__all__ = ["SLAConfig", "SparseLinearAttention", "sparse_linear_attention", "sla_parts", "convert_to_sla_",
           "convert_attention_", "route_torch_sdpa", "sla_modules", "projection_parameters", "plan_blocks",
           "BlockPlan", "compressed_attention_map", "density", "sparse_linear_attention_reference",
           "sparse_only_reference", "linear_only_reference", "sdpa_backend"]


def sdpa_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """The 'sla' backend of fewer.attention.sdpa (torch's signature; config: SLAConfig or module)."""
    if attn_mask is not None:
        raise NotImplementedError("the SLA backend takes no attn_mask (block selection replaces masking)")
    if is_causal:
        raise NotImplementedError("the SLA backend is non-causal (it is built for bidirectional DiT attention)")
    if dropout_p != 0.0:
        raise NotImplementedError("the SLA backend has no attention dropout; pass dropout_p=0.0")
    if q.dim() != 4:
        raise ValueError(f"the SLA backend needs [B, H, L, D] inputs; got query shape {tuple(q.shape)}")
    if enable_gqa and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if config is None:
        config = SLAConfig()
    if isinstance(config, SparseLinearAttention):
        return config(q, k, v, scale=scale)
    if isinstance(config, SLAConfig):
        return sparse_linear_attention(q, k, v, config, proj=None, scale=scale)
    raise TypeError(f"the SLA backend takes config=SLAConfig or SparseLinearAttention, got {type(config).__name__}")


def _check(_q: torch.Tensor) -> Capability:
    return Capability(True, "SLA runs the fused Triton kernels where they can run, else PyTorch")


register_backend("sla", sdpa_backend, _check,
                 description="Sparse-Linear Attention (needs config=SLAConfig or SparseLinearAttention)")

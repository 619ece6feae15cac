"""Small building blocks shared by the reference models: RMSNorm and sin-cos embeddings.

Everything here is plain PyTorch; the models stay readable because these few helpers live once.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistic computed in float32 (LLaMA's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def sincos_1d(dim: int, positions: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos features of `positions` (any float tensor, shape [...]): shape [..., dim].

    Frequencies are max_period**(-i / (dim/2)) for i = 0 .. dim/2 - 1, computed in float64 so that
    large positions (e.g. time * 1000) keep their precision; the result is float32.
    The first half of the features is sin, the second half cos.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()

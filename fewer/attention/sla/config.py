"""SLAConfig: what Sparse-Linear Attention computes (block sizes, budgets, feature map, variant)."""

from __future__ import annotations

import dataclasses
import math

from ...core import Config, ConfigError, check_choice, check_positive_int, check_range

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("complement", "all")
BACKENDS = ("auto", "triton", "reference")
# Block sizes the fused Triton kernels take (tl.dot needs power-of-two tiles of at least 16).
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLAConfig(Config):
    """Sparse-Linear Attention (arXiv 2509.24006).

    Per query block the key blocks are ranked by the compressed attention map
    softmax(pool(Q) pool(K)^T * scale); the top ``topk`` fraction is *critical* (exact block-sparse
    softmax attention), the bottom ``negligible`` fraction is skipped, the rest is *marginal*
    (linear attention with feature map ``feature_map``). Sparsity of the softmax part is 1 - topk.

    - ``topk``: k_h, the critical fraction (count = floor(topk * key blocks), at least 1).
    - ``negligible``: k_l, the skipped fraction (floor(negligible * key blocks)); 0 = the official
      code's behaviour (no negligible class).
    - ``linear_scope``: "complement" (the paper and the SLA-1 branch: linear attention over the
      marginal blocks only) or "all" (the official main branch: linear attention over all tokens).
    - ``smooth_k``: subtract the per-head token mean of K before pooling (the official code's
      scoring; it does not change the softmax attention itself).
    - ``feature_map``: phi for the linear branch, over the head dim: softmax, elu (elu+1) or relu.
    - ``linear_eps``: added to the linear branch's denominator (the official code uses 1e-5).
    - ``backend``: "triton" (fused kernels), "reference" (pure PyTorch), "auto" (triton if it can run).
    """

    block_q: int = 64
    block_k: int = 64
    topk: float = 0.05
    negligible: float = 0.10
    feature_map: str = "softmax"
    linear_scope: str = "complement"
    smooth_k: bool = False
    linear_eps: float = 1e-5
    backend: str = "auto"

    def validate(self) -> None:
        check_positive_int(self, "block_q")
        check_positive_int(self, "block_k")
        check_range(self, "topk", 0.0, 1.0, low_open=True)
        check_range(self, "negligible", 0.0, 1.0, high_open=True)
        check_choice(self, "feature_map", FEATURE_MAPS)
        check_choice(self, "linear_scope", LINEAR_SCOPES)
        check_choice(self, "backend", BACKENDS)
        check_range(self, "linear_eps", 0.0, None)
        if self.topk + self.negligible > 1.0 + 1e-12:
            raise ConfigError(f"SLAConfig.topk={self.topk!r} + negligible={self.negligible!r} exceeds 1: "
                              "critical and negligible fractions must leave room for each other")
        if self.linear_scope == "all" and self.negligible > 0:
            raise ConfigError(f"SLAConfig.negligible={self.negligible!r} is not allowed with linear_scope='all' "
                              "(that variant runs linear attention over every token, so nothing is skipped); "
                              "use negligible=0 or linear_scope='complement'")

    @property
    def sparsity(self) -> float:
        """Nominal fraction of blocks not computed by softmax attention (1 - topk)."""
        return 1.0 - self.topk

    def block_counts(self, num_key_blocks: int) -> tuple[int, int]:
        """(critical, negligible) block counts per query row for this many key blocks."""
        if num_key_blocks <= 0:
            raise ValueError(f"need at least one key block, got {num_key_blocks}")
        critical = min(num_key_blocks, max(1, math.floor(self.topk * num_key_blocks + 1e-9)))
        negligible = min(num_key_blocks - critical, math.floor(self.negligible * num_key_blocks + 1e-9))
        return critical, negligible

    def check_kernel_blocks(self) -> None:
        """Raise if the fused kernels cannot take these block sizes."""
        for field in ("block_q", "block_k"):
            value = getattr(self, field)
            if value not in KERNEL_BLOCK_SIZES:
                raise ConfigError(f"SLAConfig.{field}={value!r} is not allowed with the triton backend: "
                                  f"choose one of {KERNEL_BLOCK_SIZES} (or backend='reference')")


# The paper's setting (SLA section 6.1): phi = softmax, k_h = 5%, k_l = 10%, 64x64 blocks.
SLAConfig.register_preset("paper")
# The official SLA-1 branch: linear over the complement of the top-k, no negligible class, smooth-K.
SLAConfig.register_preset("official-sla1", topk=0.1, negligible=0.0, smooth_k=True)
# The official main branch / TurboDiffusion: linear attention over all tokens, outside the kernel.
SLAConfig.register_preset("official-main", topk=0.1, negligible=0.0, smooth_k=True, linear_scope="all")
# TurboDiffusion's default sla_topk.
SLAConfig.register_preset("turbodiffusion", topk=0.1, negligible=0.0, smooth_k=True, linear_scope="all",
                          block_q=128, block_k=64)

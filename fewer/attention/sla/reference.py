"""Sparse-Linear Attention in plain PyTorch: the CPU path and the oracle of the fused kernels.

Everything here is differentiable through autograd. The split into critical / marginal / negligible
blocks (``plan_blocks``) is shared with the Triton path, so both compute the same function; the
attention itself is computed here with explicit token-level masks, O(Lq * Lk) memory.

    O   = O_s + proj(O_l)
    O_s = softmax attention over the critical blocks only
    O_l = phi(Q) H / (phi(Q) Z + eps),  H = sum phi(K_t)^T V_t,  Z = sum phi(K_t)
          over the marginal blocks ("complement") or over all tokens ("all")
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import SLAConfig

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi over the head dim, in x's dtype (callers upcast first when they want fp32)."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r}; choose softmax, elu or relu")


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over consecutive blocks of ``block`` tokens [..., L, D] -> [..., ceil(L/block), D];
    the last, possibly partial block is averaged over its real tokens only."""
    length = x.shape[-2]
    full = length // block
    # reduce in fp32 without materialising an fp32 copy of x (it is large at video shapes)
    parts = [x[..., :full * block, :].unflatten(-2, (full, block)).mean(-2, dtype=torch.float32)] if full else []
    if length > full * block:
        parts.append(x[..., full * block:, :].mean(-2, keepdim=True, dtype=torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def compressed_attention_map(q: torch.Tensor, k: torch.Tensor, cfg: SLAConfig,
                             scale: float | None = None) -> torch.Tensor:
    """P_c = softmax(pool(Q) pool(K)^T * scale) over key blocks (SLA Eq. 2), fp32 [B, H, Mq, Mk]."""
    return torch.softmax(_pooled_scores(q, k, cfg, scale), dim=-1)


def _pooled_scores(q: torch.Tensor, k: torch.Tensor, cfg: SLAConfig, scale: float | None,
                   pooled: tuple | None = None) -> torch.Tensor:
    """Block scores pool(Q) pool(K)^T * scale; ``pooled``: (pool_blocks(q, block_q), pool_blocks(k,
    block_k)) already computed (fp32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pq, pk = pooled if pooled is not None else (pool_blocks(q, cfg.block_q), pool_blocks(k, cfg.block_k))
    if cfg.smooth_k:
        # pool(K - mean_t K) = pool(K) - mean_t K, so the centred K is never materialised; the token
        # mean is the block means weighted by block sizes (no second pass over K). Python-scalar
        # weights only: writing a scalar into a device tensor would be a blocking host copy.
        lk = k.shape[-2]
        last = lk - cfg.block_k * (pk.shape[-2] - 1)
        token_sum = pk[..., :-1, :].sum(dim=-2, keepdim=True) * cfg.block_k + pk[..., -1:, :] * last
        pk = pk - token_sum / lk
    return pq @ pk.transpose(-2, -1) * scale


class BlockPlan(NamedTuple):
    """Which key blocks each query block treats as critical / negligible (the rest: marginal).

    ``critical``: [B, H, Mq, n_critical] int32 key-block ids, best first;
    ``negligible``: [B, H, Mq, n_negligible] int32 key-block ids;
    ``classes``: [B, H, Mq, Mk] int8 with CRITICAL=1, MARGINAL=0, NEGLIGIBLE=-1.
    """
    critical: torch.Tensor
    negligible: torch.Tensor
    classes: torch.Tensor

    @property
    def num_critical(self) -> int:
        return self.critical.shape[-1]

    @property
    def num_negligible(self) -> int:
        return self.negligible.shape[-1]

    @property
    def num_marginal(self) -> int:
        return self.classes.shape[-1] - self.num_critical - self.num_negligible


@torch.no_grad()
def plan_blocks(q: torch.Tensor, k: torch.Tensor, cfg: SLAConfig, scale: float | None = None,
                pooled: tuple | None = None) -> BlockPlan:
    """Classify key blocks per query block (SLA Eq. 3): top k_h critical, bottom k_l negligible."""
    # the softmax of Eq. 2 is monotone per row, so the ranking uses the pooled scores directly
    scores = _pooled_scores(q, k, cfg, scale, pooled)
    num_key_blocks = scores.shape[-1]
    n_crit, n_neg = cfg.block_counts(num_key_blocks)
    # top-k rather than a full sort: at Wan-14B shapes a row has 1182 blocks and we keep ~5%
    critical = torch.topk(scores, n_crit, dim=-1, largest=True, sorted=True).indices.to(torch.int32).contiguous()
    if n_neg:
        negligible = torch.topk(scores, n_neg, dim=-1, largest=False, sorted=True).indices.to(torch.int32).contiguous()
    else:
        negligible = critical[..., :0]
    classes = torch.zeros(scores.shape, dtype=torch.int8, device=q.device)
    classes.scatter_(-1, critical.long(), CRITICAL)
    if n_neg:
        classes.scatter_(-1, negligible.long(), NEGLIGIBLE)
    return BlockPlan(critical, negligible, classes)


def token_masks(plan: BlockPlan, lq: int, lk: int, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level (critical, marginal) bool masks [B, H, Lq, Lk] from the block classes."""
    classes = plan.classes.repeat_interleave(block_q, dim=-2)[..., :lq, :]
    classes = classes.repeat_interleave(block_k, dim=-1)[..., :lk]
    return classes == CRITICAL, classes == MARGINAL


def sla_parts_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SLAConfig,
                        scale: float | None = None, plan: BlockPlan | None = None,
                        compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_s, O_l) in ``compute_dtype``: the sparse softmax part and the linear part before proj."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if plan is None:
        plan = plan_blocks(q, k, cfg, scale)
    lq, lk = q.shape[-2], k.shape[-2]
    critical, marginal = token_masks(plan, lq, lk, cfg.block_q, cfg.block_k)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))

    scores = (qf @ kf.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~critical, float("-inf"))  # every row keeps >= 1 critical block
    out_sparse = torch.softmax(scores, dim=-1) @ vf

    qphi, kphi = apply_feature_map(qf, cfg.feature_map), apply_feature_map(kf, cfg.feature_map)
    if cfg.linear_scope == "all":
        kv = kphi.transpose(-2, -1) @ vf
        num = qphi @ kv
        den = qphi @ kphi.sum(dim=-2).unsqueeze(-1)
    else:
        weights = (qphi @ kphi.transpose(-2, -1)) * marginal
        num = weights @ vf
        den = weights.sum(dim=-1, keepdim=True)
    out_linear = num / (den + cfg.linear_eps)
    return out_sparse, out_linear


def combine(out_sparse: torch.Tensor, out_linear: torch.Tensor, proj_weight: torch.Tensor | None,
            proj_bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """O = O_s + proj(O_l); proj is a d->d linear map shared by all heads (None: zero map)."""
    if proj_weight is None:
        return out_sparse.to(out_dtype)
    projected = F.linear(out_linear.to(proj_weight.dtype), proj_weight, proj_bias)
    return projected.add_(out_sparse).to(out_dtype)  # in place: one fewer pass over a large tensor


def sparse_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SLAConfig,
                                      proj_weight: torch.Tensor | None = None,
                                      proj_bias: torch.Tensor | None = None, scale: float | None = None,
                                      plan: BlockPlan | None = None,
                                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole SLA output in PyTorch, in q's dtype."""
    out_sparse, out_linear = sla_parts_reference(q, k, v, cfg, scale, plan, compute_dtype)
    return combine(out_sparse, out_linear, proj_weight, proj_bias, q.dtype)


def sparse_only_reference(q, k, v, cfg: SLAConfig, scale=None, plan=None, compute_dtype=torch.float32):
    """The ablation 'sparse-only': the same critical blocks, no linear branch."""
    return sla_parts_reference(q, k, v, cfg, scale, plan, compute_dtype)[0].to(q.dtype)


def linear_only_reference(q, k, v, cfg: SLAConfig, compute_dtype=torch.float32):
    """The ablation 'linear-only': linear attention with phi over all tokens, no softmax part."""
    qphi, kphi = (apply_feature_map(t.to(compute_dtype), cfg.feature_map) for t in (q, k))
    vf = v.to(compute_dtype)
    num = qphi @ (kphi.transpose(-2, -1) @ vf)
    den = qphi @ kphi.sum(dim=-2).unsqueeze(-1)
    return (num / (den + cfg.linear_eps)).to(q.dtype)


def density(plan: BlockPlan, lq: int, lk: int, block_q: int, block_k: int) -> float:
    """Computed softmax token pairs / (Lq * Lk), counting partial tail blocks by their real size."""
    q_sizes = torch.full((plan.classes.shape[-2],), block_q, device=plan.classes.device)
    q_sizes[-1] = lq - block_q * (q_sizes.numel() - 1)
    k_sizes = torch.full((plan.classes.shape[-1],), block_k, device=plan.classes.device)
    k_sizes[-1] = lk - block_k * (k_sizes.numel() - 1)
    pairs = ((plan.classes == CRITICAL).float() * q_sizes[:, None] * k_sizes[None, :]).sum(dim=(-2, -1))
    return float(pairs.mean() / (lq * lk))

"""SparseLinearAttention (the nn.Module with the learnable projection) and model converters.

A converted attention layer keeps its own q/k/v/o projections and parameter names; it gains a child
``sla`` (a SparseLinearAttention holding the zero-initialised proj) and, while it runs, routes its
``fewer.attention.sdpa`` calls (and, optionally, torch's ``F.scaled_dot_product_attention`` calls)
to that child. At conversion the output equals sparse-only attention (proj is zero); fine-tuning
teaches proj to use the linear branch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SLAConfig
from .ops import sla_attention
from .reference import BlockPlan, density


class SparseLinearAttention(nn.Module):
    """O = O_s + proj(O_l) over [B, H, L, D] inputs; proj is d -> d, shared by the heads, fp32,
    zero-initialised (as the official code does), so a fresh module equals sparse-only attention."""

    def __init__(self, head_dim: int, config: SLAConfig | None = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        self.head_dim = head_dim
        self.config = config or SLAConfig()
        self.proj = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.last_plan: BlockPlan | None = None
        self._last_lengths = (0, 0)

    def last_density(self) -> float:
        """Softmax density (computed token pairs / Lq*Lk) of the last forward (syncs the GPU)."""
        if self.last_plan is None:
            raise RuntimeError("no forward has run yet")
        return density(self.last_plan, *self._last_lengths, self.config.block_q, self.config.block_k)

    def extra_repr(self) -> str:
        c = self.config
        return (f"head_dim={self.head_dim}, topk={c.topk}, negligible={c.negligible}, blocks={c.block_q}x{c.block_k}, "
                f"feature_map={c.feature_map!r}, linear_scope={c.linear_scope!r}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"SparseLinearAttention was built for head_dim {self.head_dim}, got {q.shape[-1]}")
        out, plan = sla_attention(q, k, v, self.config, self.proj.weight, self.proj.bias, scale)
        self.last_plan, self._last_lengths = plan, (q.shape[-2], k.shape[-2])
        return out


def sparse_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SLAConfig | None = None,
                            proj: nn.Linear | None = None, scale: float | None = None) -> torch.Tensor:
    """Functional SLA; without ``proj`` the linear branch's projection is the zero map (O = O_s)."""
    cfg = config or SLAConfig()
    if proj is None:
        return sla_attention(q, k, v, cfg, None, None, scale)[0]
    return sla_attention(q, k, v, cfg, proj.weight, proj.bias, scale)[0]


# ---------------------------------------------------------------------------------------------
# Routing sdpa calls to a module, and converters
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def route_torch_sdpa(sla: SparseLinearAttention) -> Iterator[None]:
    """Within the block, torch.nn.functional.scaled_dot_product_attention runs ``sla`` (the patch
    for models that call torch directly). Masks, causal and dropout raise, as in the backend."""
    from . import sdpa_backend

    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sla)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


_CONVERTED_CLASSES: dict[type, type] = {}


def _sla_class(cls: type, patch_torch: bool) -> type:
    key = (cls, patch_torch)
    if key not in _CONVERTED_CLASSES:
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            from ..dispatch import use_backend
            with use_backend("sla", self.sla):
                if patch_torch:
                    with route_torch_sdpa(self.sla):
                        return cls.forward(self, *args, **kwargs)
                return cls.forward(self, *args, **kwargs)

        _CONVERTED_CLASSES[key] = type(f"SLA{cls.__name__}", (cls,), {"forward": forward,
                                                                    "__module__": __name__})
    return _CONVERTED_CLASSES[key]


def convert_attention_(module: nn.Module, head_dim: int, config: SLAConfig | None = None,
                       patch_torch_sdpa: bool = False) -> nn.Module:
    """Make one attention module run SLA in place: adds ``module.sla`` and routes its sdpa calls."""
    if hasattr(module, "sla"):
        raise ValueError(f"{type(module).__name__} already has an 'sla' child (converted twice?)")
    param = next(module.parameters(), None)
    module.sla = SparseLinearAttention(head_dim, config)
    if param is not None:
        module.sla.to(param.device)
    module.__class__ = _sla_class(type(module), patch_torch_sdpa)
    return module


def convert_to_sla_(model: nn.Module, config: SLAConfig | None = None,
                    select: Callable[[str, nn.Module], bool] | None = None,
                    patch_torch_sdpa: bool = False) -> list[str]:
    """Convert every attention layer of ``model`` in place; returns the converted module names.

    By default the layers converted are those with ``heads`` and ``head_dim`` attributes whose
    forward calls ``fewer.attention.sdpa`` (fewer's DiT ``Attention``). ``select(name, module)``
    picks others; ``patch_torch_sdpa=True`` also routes torch's F.scaled_dot_product_attention
    inside them (any model). Each layer gets its own projection.
    """
    converted = []
    for name, module in list(model.named_modules()):
        if hasattr(module, "sla") or isinstance(module, SparseLinearAttention):
            continue
        chosen = select(name, module) if select is not None else (
            hasattr(module, "head_dim") and hasattr(module, "heads"))
        if not chosen:
            continue
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            raise ValueError(f"module {name!r} has no integer head_dim; convert it with convert_attention_")
        convert_attention_(module, head_dim, config, patch_torch_sdpa)
        converted.append(name)
    if not converted:
        raise ValueError("convert_to_sla_ found no attention layer (modules with heads and head_dim); "
                         "pass select= to choose them")
    return converted


def sla_modules(model: nn.Module) -> list[SparseLinearAttention]:
    return [m for m in model.modules() if isinstance(m, SparseLinearAttention)]


def projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The SLA projections' parameters (e.g. for a separate learning rate)."""
    return [p for m in sla_modules(model) for p in m.proj.parameters()]

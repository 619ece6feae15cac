"""The one attention entry point, ``sdpa``, and its backend registry.

``sdpa`` has exactly the signature of ``torch.nn.functional.scaled_dot_product_attention`` plus
``backend=`` and ``config=``. Every fewer model calls it, so a method plugs in by registering a
backend, never by forking a model. Built-in backends:

- ``torch``: torch's own SDPA, letting torch pick its kernel (the AUTO default);
- ``math``, ``flash``, ``efficient``, ``cudnn``: torch's SDPA forced onto one kernel;
- ``reference``: an explicit float32 softmax(QK^T)V in PyTorch, the oracle for fewer's kernels.

Method packages (``fewer.attention.sage``, ``.sla``, ``.jvp``) register their own backends when
imported; ``sdpa`` imports them on first use, so registration needs no edit here.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..core.backend import AUTO, resolve_backend
from ..core.capability import Capability, has_cuda

AttentionFn = Callable[..., torch.Tensor]

# Packages that register backends on import. Missing ones are skipped.
_PLUGIN_MODULES = ("fewer.attention.sage", "fewer.attention.sla", "fewer.attention.jvp")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn                      # fn(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)
    check: Callable[[torch.Tensor], Capability]  # can it run on this query tensor?
    auto: bool = False                   # may AUTO choose it?
    description: str = ""


_REGISTRY: dict[str, Backend] = {}
_plugins_loaded = False
_default_backend: contextvars.ContextVar[str] = contextvars.ContextVar("fewer_attention_backend", default=AUTO)
_default_config: contextvars.ContextVar[Any] = contextvars.ContextVar("fewer_attention_config", default=None)


def register_backend(name: str, fn: AttentionFn, check: Callable[[torch.Tensor], Capability], *,
                     auto: bool = False, description: str = "") -> None:
    """Add an attention backend. ``check(query)`` says whether it can run on that input's device."""
    name = name.lower()
    if name == AUTO:
        raise ValueError("'auto' is reserved for backend resolution")
    _REGISTRY[name] = Backend(name, fn, check, auto, description)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGIN_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(module)


def available_backends() -> dict[str, Backend]:
    _load_plugins()
    return dict(_REGISTRY)


@contextlib.contextmanager
def use_backend(name: str, config: Any = None) -> Iterator[None]:
    """Within the block, calls to ``sdpa`` that leave ``backend`` as 'auto' use ``name``."""
    available = available_backends()
    if name.lower() != AUTO and name.lower() not in available:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(available)}")
    token_b = _default_backend.set(name.lower())
    token_c = _default_config.set(config)
    try:
        yield
    finally:
        _default_backend.reset(token_b)
        _default_config.reset(token_c)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False, *, backend: str = AUTO, config: Any = None) -> torch.Tensor:
    """Scaled dot-product attention, [B, H, L, D] layout, through the chosen backend.

    ``backend='auto'`` uses the backend set by ``use_backend`` or, outside one, torch's SDPA.
    An explicitly named backend that cannot run on these inputs raises BackendUnavailable.
    """
    _check_inputs(query, key, value, enable_gqa)
    available = available_backends()
    requested = (backend or AUTO).lower()
    if requested == AUTO:
        requested = _default_backend.get()
        if config is None:
            config = _default_config.get()
    candidates = {name: (lambda b=b: b.check(query)) for name, b in available.items()
                  if requested != AUTO or b.auto}
    if requested != AUTO and requested not in available:
        raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of {sorted(available)}")
    chosen = resolve_backend("attention.sdpa", requested, candidates)
    return available[chosen].fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str] = ("query", "key", "value")
              ) -> None:
    """What every attention entry point requires of q, k, v ([..., L, D] tensors of one dtype and device, matching
    head dims and key/value lengths); raises naming the inputs by ``names``."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims [..., L, D]; got shape {tuple(t.shape)}")
    nq, nk, nv = names
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{nq}, {nk} and {nv} must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk} and {nv} must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nq} and {nk} head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{nk} and {nv} lengths differ: {k.shape[-2]} vs {v.shape[-2]}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> None:
    check_qkv(q, k, v)
    if q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1]:
        if not enable_gqa:
            raise ValueError(f"query has {q.shape[1]} heads but key has {k.shape[1]}: pass enable_gqa=True for GQA/MQA")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"GQA needs query heads ({q.shape[1]}) divisible by key heads ({k.shape[1]})")


# ---------------------------------------------------------------------------------------------
# Built-in backends
# ---------------------------------------------------------------------------------------------

def _torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    if config is not None:
        raise ValueError(f"the torch SDPA backends take no config; got {type(config).__name__}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _forced(kernel_name: str) -> AttentionFn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, kernel_name)

    def run(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
        with sdpa_kernel([kernel]):
            return _torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)

    return run


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False, *, compute_dtype: torch.dtype = torch.float32,
                        return_lse: bool = False):
    """softmax(Q K^T * scale + mask) V computed explicitly in ``compute_dtype``; output in q's dtype.

    Causal masking is top-left aligned, as torch's SDPA does when query and key lengths differ.
    Rows with every key masked give zeros (torch's math backend gives NaN there).
    """
    if dropout_p != 0.0:
        raise NotImplementedError("reference_attention has no dropout; pass dropout_p=0.0")
    out_dtype = q.dtype
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    if enable_gqa and qf.dim() >= 3 and qf.shape[-3] != kf.shape[-3]:
        rep = qf.shape[-3] // kf.shape[-3]
        kf = kf.repeat_interleave(rep, dim=-3)
        vf = vf.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (qf @ kf.transpose(-2, -1)) * scale
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute_dtype)
    # Softmax written out (not torch.logsumexp) so that forward-mode AD and double backward work through it.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # fully masked rows
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))  # fully masked rows give zeros
    out = (probs @ vf).to(out_dtype)
    if not return_lse:
        return out
    return out, (total.log() + row_max).squeeze(-1)


def _reference_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    if config is not None:
        raise ValueError(f"the reference backend takes no config; got {type(config).__name__}")
    return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _always(_q: torch.Tensor) -> Capability:
    return Capability(True, "runs on any device")


def _needs_cuda(what: str) -> Callable[[torch.Tensor], Capability]:
    def check(q: torch.Tensor) -> Capability:
        if q.device.type != "cuda":
            return Capability(False, f"the {what} kernel needs CUDA tensors; got {q.device.type}")
        return has_cuda()
    return check


register_backend("torch", _torch_sdpa, _always, auto=True,
                 description="torch SDPA; torch picks flash, cuDNN, efficient or math")
register_backend("reference", _reference_backend, _always,
                 description="explicit float32 softmax(QK^T)V in PyTorch (the oracle)")
register_backend("math", _forced("MATH"), _always, description="torch SDPA, math kernel")
register_backend("flash", _forced("FLASH_ATTENTION"), _needs_cuda("flash"),
                 description="torch SDPA, FlashAttention-2 kernel")
register_backend("efficient", _forced("EFFICIENT_ATTENTION"), _needs_cuda("memory-efficient"),
                 description="torch SDPA, memory-efficient kernel")
register_backend("cudnn", _forced("CUDNN_ATTENTION"), _needs_cuda("cuDNN"),
                 description="torch SDPA, cuDNN kernel")

"""Route a model's attention through fewer without editing the model.

Two ways in:

1. ``patch_sdpa``: while active, ``torch.nn.functional.scaled_dot_product_attention`` is replaced by a
   function that calls ``fewer.attention.sdpa(..., backend=...)``. Pass the model to exclude layers by
   qualified name (glob patterns such as ``"vae.*"`` or ``"layers.0.*"``, or a predicate).

       with patch_sdpa(model, backend="sage", exclude=["vae.*"]) as stats:
           model(x)
       print(stats.routed, stats.excluded)

   A call the backend cannot take (an attn_mask, dropout) raises, as a direct call would. With
   ``fallback=True`` such calls run torch's original SDPA instead, and ``stats.fallbacks`` counts
   them by reason: an explicit choice, never a silent one. Code that bound the function before the
   patch (``from torch.nn.functional import scaled_dot_product_attention``) is not affected.

2. ``register_transformers``: registers fewer as a Hugging Face transformers attention
   implementation (``AttentionInterface``), so ``LlamaForCausalLM.from_config(cfg,
   attn_implementation="fewer_sage")`` uses it in every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..core.backend import BackendUnavailable
from ..core.deps import require
from .dispatch import sdpa

ExcludeSpec = Iterable[str] | Callable[[str], bool] | None

_module_stack: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fewer_module_stack", default=())
_inside_patch: contextvars.ContextVar[bool] = contextvars.ContextVar("fewer_inside_patch", default=False)


@dataclass
class PatchStats:
    """What the patch did: calls sent to fewer, calls left to torch by exclusion, fallbacks by reason."""

    routed: int = 0
    excluded: int = 0
    fallbacks: Counter = field(default_factory=Counter)


def _exclusion_test(exclude: ExcludeSpec) -> Callable[[str], bool]:
    if exclude is None:
        return lambda name: False
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"exclude takes glob patterns (str) or a predicate; got {type(p).__name__}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _track_modules(model: torch.nn.Module) -> list[Any]:
    """Hooks that keep the qualified names of the modules currently running in ``_module_stack``."""
    handles = []
    tokens: list[contextvars.Token] = []
    for name, module in model.named_modules():
        if not name:
            continue

        def enter(_mod, _args, name=name):
            tokens.append(_module_stack.set(_module_stack.get() + (name,)))

        def leave(_mod, _args, _out, name=name):
            if tokens:
                _module_stack.reset(tokens.pop())

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


class SdpaPatch:
    """An installed patch; ``remove()`` restores the function that was there before."""

    def __init__(self, model: torch.nn.Module | None, backend: str, config: Any, exclude: ExcludeSpec,
                 fallback: bool) -> None:
        if exclude is not None and model is None:
            raise ValueError("exclude needs the model (patch_sdpa(model, exclude=...)) to know the layer names")
        self.backend, self.config, self.fallback = backend, config, fallback
        self.stats = PatchStats()
        self._excluded = _exclusion_test(exclude)
        self._previous = F.scaled_dot_product_attention
        self._handles = _track_modules(model) if model is not None else []
        original = self._previous

        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
            if _inside_patch.get():  # a backend that itself calls torch SDPA must reach the original
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            if any(self._excluded(name) for name in _module_stack.get()):
                self.stats.excluded += 1
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            token = _inside_patch.set(True)
            try:
                out = sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           backend=self.backend, config=self.config)
            except (NotImplementedError, ValueError, BackendUnavailable) as exc:
                if not self.fallback:
                    raise
                self.stats.fallbacks[f"{type(exc).__name__}: {exc}"] += 1
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            finally:
                _inside_patch.reset(token)
            self.stats.routed += 1
            return out

        self._patched = scaled_dot_product_attention
        F.scaled_dot_product_attention = scaled_dot_product_attention

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if F.scaled_dot_product_attention is self._patched:
            F.scaled_dot_product_attention = self._previous


def apply_patch(model: torch.nn.Module | None = None, *, backend: str = "sage", config: Any = None,
                exclude: ExcludeSpec = None, fallback: bool = False) -> SdpaPatch:
    """Install the patch until ``.remove()`` (prefer the ``patch_sdpa`` context manager)."""
    return SdpaPatch(model, backend, config, exclude, fallback)


@contextlib.contextmanager
def patch_sdpa(model: torch.nn.Module | None = None, *, backend: str = "sage", config: Any = None,
               exclude: ExcludeSpec = None, fallback: bool = False) -> Iterator[PatchStats]:
    """Within the block, F.scaled_dot_product_attention calls go to fewer's ``backend``; yields PatchStats."""
    patch = apply_patch(model, backend=backend, config=config, exclude=exclude, fallback=fallback)
    try:
        yield patch.stats
    finally:
        patch.remove()


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

def _mask_kind(mask: torch.Tensor, q_len: int, kv_len: int) -> str:
    """'none' (every key visible), 'causal' (top-left causal) or 'other' for an HF 4-D mask."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed.expand(allowed.shape[0], allowed.shape[1], q_len, kv_len)
    if bool(allowed.all()):
        return "none"
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    if bool((allowed == causal).all()):
        return "causal"
    return "other"


def make_transformers_attention(backend: str = "sage", config: Any = None) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function with the signature transformers' AttentionInterface expects."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        for unsupported in ("softcap", "sliding_window", "position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"fewer attention ({backend}) does not support {unsupported}; "
                                          f"use attn_implementation='sdpa' for this model")
        if kwargs.get("output_attentions"):
            raise NotImplementedError("fewer attention returns no attention weights (output_attentions=True)")
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if attention_mask is not None:
            kind = _mask_kind(attention_mask, q_len, kv_len)
            if kind == "other":
                raise NotImplementedError(
                    f"fewer attention ({backend}) takes only plain causal or full attention; this attention_mask "
                    f"(padding, bottom-right causal with a cache, or custom) needs attn_implementation='sdpa'")
            causal = kind == "causal"
        else:
            causal = causal and q_len > 1
            if causal and q_len != kv_len:
                raise NotImplementedError("causal attention with a KV cache (q_len != kv_len) is bottom-right "
                                          "aligned; fewer attention is top-left aligned like torch SDPA")
        out = sdpa(query, key, value, None, dropout, causal, scaling, query.shape[1] != key.shape[1],
                   backend=backend, config=config)
        return out.transpose(1, 2).contiguous(), None

    return attention


def register_transformers(name: str = "fewer_sage", *, backend: str = "sage", config: Any = None) -> str:
    """Register fewer as transformers attention implementation ``name`` (with SDPA's mask builder)."""
    transformers = require("transformers", purpose="registering fewer attention with transformers")
    transformers.AttentionInterface.register(name, make_transformers_attention(backend, config))
    masking = require("transformers.masking_utils")
    masking.AttentionMaskInterface.register(name, masking.sdpa_mask)
    return name


__all__ = ["PatchStats", "SdpaPatch", "apply_patch", "make_transformers_attention", "patch_sdpa",
           "register_transformers"]

"""JVP attention: torch.library ops, autograd Functions and the two public functions.

Layers (Triton kernel -> torch.library op -> autograd.Function -> public function):

- ``fewer::jvp_attention_fwd`` (q, k, v, tq, tk, tv) -> (O, tO, LSE) and ``fewer::jvp_attention_primal_fwd``
  (q, k, v) -> (O, LSE): the Triton launches, with fake implementations so torch.compile can trace them;
- ``_JvpAttentionFn``: (O, tO) with a backward to all six inputs (PyTorch recomputation, chunked
  over queries): gradients flow through the tangent output too;
- ``_AttentionFn``: O with a backward to (q, k, v) and a ``jvp`` rule that calls ``_JvpAttentionFn``, so
  forward_ad and torch.func.jvp get O's tangent from the fused kernel and that tangent is itself
  differentiable (sCM/MeanFlow-style losses that backpropagate through a JVP);
- ``jvp_attention`` and ``attention``: validate, pick the backend ('triton' or the PyTorch 'reference')
  and reshape any [..., L, D] input to [B, H, L, D].
"""

from __future__ import annotations

import math

import torch

from ...core.backend import AUTO, resolve_backend
from ...core.capability import Capability, can_run_triton
from ..dispatch import check_qkv
from . import reference as ref

MAX_HEAD_DIM = 128          # the kernel keeps a [BLOCK_M, D] tile of q, tq and two accumulators in registers
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_BACKWARD_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# torch.library ops (the Triton launches)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fewer::jvp_attention_fwd", mutates_args=())
def _jvp_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                       tv: torch.Tensor, is_causal: bool, scale: float,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton as kernels
    out, t_out, lse = kernels.jvp_attention_forward(q, k, v, tq, tk, tv, is_causal, scale)
    return out, t_out, lse


@_jvp_attention_fwd.register_fake
def _jvp_attention_fwd_fake(q, k, v, tq, tk, tv, is_causal, scale):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, torch.empty_like(out), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fewer::jvp_attention_primal_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton as kernels
    out, _, lse = kernels.jvp_attention_forward(q, k, v, None, None, None, is_causal, scale)
    return out, lse


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# autograd Functions (inputs already validated, [B, H, L, D], inner stride 1)
# ---------------------------------------------------------------------------------------------

class _JvpAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, tq, tk, tv, is_causal, scale, backward_chunk):
        out, t_out, _ = torch.ops.fewer.jvp_attention_fwd(q, k, v, tq, tk, tv, is_causal, scale)
        return out, t_out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, is_causal, scale, backward_chunk = inputs
        ctx.save_for_backward(q, k, v, tq, tk, tv)
        ctx.is_causal, ctx.scale, ctx.backward_chunk = is_causal, scale, backward_chunk

    @staticmethod
    def backward(ctx, grad_out, grad_t_out):
        q, k, v, tq, tk, tv = ctx.saved_tensors
        grads = ref.jvp_attention_backward(q, k, v, tq, tk, tv, grad_out, grad_t_out, ctx.is_causal, ctx.scale,
                                           chunk_size=ctx.backward_chunk)
        return (*grads, None, None, None)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, is_causal, scale, backward_chunk):
        out, _ = torch.ops.fewer.jvp_attention_primal_fwd(q, k, v, is_causal, scale)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, is_causal, scale, backward_chunk = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)
        ctx.is_causal, ctx.scale, ctx.backward_chunk = is_causal, scale, backward_chunk

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = ref.attention_backward(q, k, v, grad_out, ctx.is_causal, ctx.scale,
                                            chunk_size=ctx.backward_chunk)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v = ctx.saved_tensors
        # Inputs without a tangent arrive as None: their tangent is zero.
        tq, tk, tv = (torch.zeros_like(p) if t is None else _inner_contiguous(t)
                      for p, t in ((q, tq), (k, tk), (v, tv)))
        _, t_out = _JvpAttentionFn.apply(q, k, v, tq, tk, tv, ctx.is_causal, ctx.scale, ctx.backward_chunk)
        return t_out


# ---------------------------------------------------------------------------------------------
# Validation, backend choice, layout
# ---------------------------------------------------------------------------------------------

def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _validate(primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...] | None, scale) -> None:
    q, k, v = primals
    check_qkv(q, k, v, names=("q", "k", "v"))
    if not q.is_floating_point():
        raise ValueError(f"attention needs floating-point inputs; got {q.dtype}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"q, k and v need equal leading (batch, head) dims, no broadcasting or GQA here; got "
                         f"{tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, {tuple(v.shape[:-2])} (for GQA use "
                         f"fewer.attention.sdpa(..., enable_gqa=True, backend='jvp'), which repeats k and v)")
    if k.shape[-2] == 0:
        raise ValueError("k and v have no keys (length 0): attention over an empty set is undefined")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    if tangents is None:
        return
    for name, p, t in zip(("tq", "tk", "tv"), primals, tangents):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"tangent {name} has shape {tuple(t.shape)} but its primal {name[1:]} has "
                             f"{tuple(p.shape)}: a tangent must have its primal's shape")
        if t.dtype != p.dtype:
            raise ValueError(f"tangent {name} has dtype {t.dtype} but its primal {name[1:]} has {p.dtype}: "
                             f"a tangent must have its primal's dtype")
        if t.device != p.device:
            raise ValueError(f"tangent {name} is on {t.device} but its primal {name[1:]} is on {p.device}")


def _check_kernel_inputs(q: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"the Triton JVP attention kernel takes float16, bfloat16 or float32, "
                                  f"got {q.dtype}; use backend='reference' for other dtypes")
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if d > MAX_HEAD_DIM:
            raise NotImplementedError(f"the Triton JVP attention kernel supports head dims up to {MAX_HEAD_DIM} "
                                      f"(64 and 128 natively, smaller ones padded); {name} has head dim {d}. "
                                      f"Use backend='reference' or split the heads")


def _kernel_takes(q: torch.Tensor, v: torch.Tensor) -> Capability:
    if q.device.type != "cuda":
        return Capability(False, f"tensors are on {q.device.type}, not CUDA")
    if q.dtype not in KERNEL_DTYPES:
        return Capability(False, f"the kernel takes float16/bfloat16/float32, not {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return Capability(False, f"the kernel takes head dims up to {MAX_HEAD_DIM}")
    return can_run_triton(q.device)


def _resolve(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    requested = (backend or AUTO).lower()
    if requested == AUTO:
        # Triton only on CUDA and for inputs it takes (on CPU the interpreter would be far slower than
        # the reference); otherwise AUTO picks the reference.
        candidates = {"triton": lambda: _kernel_takes(q, v),
                      "reference": lambda: Capability(True, "PyTorch runs anywhere")}
    else:
        candidates = {"triton": lambda: can_run_triton(q.device),
                      "reference": lambda: Capability(True, "PyTorch runs anywhere")}
    return resolve_backend("attention.jvp", requested, candidates)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return _inner_contiguous(t)
    if t.dim() == 3:
        return _inner_contiguous(t.unsqueeze(0))
    return _inner_contiguous(t.reshape(-1, *t.shape[-3:]))


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                  tv: torch.Tensor, *, is_causal: bool = False, scale: float | None = None,
                  backend: str = AUTO, backward_chunk: int = DEFAULT_BACKWARD_CHUNK,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output O = softmax(scale Q K^T) V and its tangent tO along (tq, tk, tv), in one pass.

    Layout [..., L, D] (e.g. [B, H, L, D]); query and key lengths may differ; ``is_causal`` masks
    top-left aligned (query i sees keys j <= i), as torch's SDPA does. ``backend``: 'auto' (Triton on
    CUDA for the inputs it takes, else the PyTorch reference), 'triton' (CUDA, or CPU under
    TRITON_INTERPRET=1; raises for what it cannot take) or 'reference'. Both outputs are differentiable w.r.t. all six inputs.
    """
    _validate((q, k, v), (tq, tk, tv), scale)
    s = _scale(q, scale)
    chosen = _resolve(backend, q, v)
    if chosen == "reference":
        return ref.jvp_attention_exact(q, k, v, tq, tk, tv, is_causal, s,
                                       compute_dtype=ref._accumulation_dtype(q))
    _check_kernel_inputs(q, v)
    out_shape = (*q.shape[:-1], v.shape[-1])
    if q.shape[-2] == 0:
        return q.new_zeros(out_shape), q.new_zeros(out_shape)
    out, t_out = _JvpAttentionFn.apply(*(_as_4d(t) for t in (q, k, v, tq, tk, tv)), bool(is_causal), s,
                                       int(backward_chunk))
    return out.reshape(out_shape), t_out.reshape(out_shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
              scale: float | None = None, backend: str = AUTO,
              backward_chunk: int = DEFAULT_BACKWARD_CHUNK) -> torch.Tensor:
    """softmax(scale Q K^T) V that supports every autodiff mode: backward, torch.func.jvp and
    forward_ad (the tangent from the fused JVP kernel on the Triton path), and backward through
    that tangent. Same layout, masking and backends as ``jvp_attention``.
    """
    _validate((q, k, v), None, scale)
    s = _scale(q, scale)
    chosen = _resolve(backend, q, v)
    if chosen == "reference":
        return ref.attention_reference(q, k, v, is_causal, s, compute_dtype=ref._accumulation_dtype(q))
    _check_kernel_inputs(q, v)
    out_shape = (*q.shape[:-1], v.shape[-1])
    if q.shape[-2] == 0:
        return q.new_zeros(out_shape)
    out = _AttentionFn.apply(_as_4d(q), _as_4d(k), _as_4d(v), bool(is_causal), s, int(backward_chunk))
    return out.reshape(out_shape)

"""QuantLinear: nn.Linear whose three GEMMs run on quantized operands, as a Recipe says.

With X [T, K] (tokens x in_features), W [N, K], dY [T, N] and Q_role the role's fake quantizer
(quantize then dequantize, fp32 values that NVFP4 / MX hardware would hold exactly):

    forward   Y  = Q_x(X) Q_w(W)^T                       blocks along K
    dgrad     dX = Q_dy_dgrad(dY H) Q_w_dgrad(H^T S_w)    blocks along N, H = block-diagonal RHT16 on N
    wgrad     dW = Q_dy_wgrad(H' dY)^T Q_x_wgrad(H' S_x)  blocks along T, H' = RHT16 on T

S_w is W (``source="master"``) or the dequantized forward-quantized Q_w(W) (``source="forward"``,
TetraJet-v2's aligned double quantization: dequant -> transpose -> RHT -> SR requant), S_x likewise.
The same signs rotate both operands of a GEMM, so H cancels in exact arithmetic (H H^T = I); the
signs are fresh per forward call (``hadamard_signs="per_call"``) or one vector for the run
(``"fixed"``). Each GEMM is then an fp32 matmul of the dequantized operands with autocast off
(emulation: the values are those of real NVFP4 hardware; only the accumulation order differs).

Seeds: each layer holds ``fqt_seed`` (set by convert_for_training from the recipe seed and the layer's
position) and counts its training forward calls; call c uses seed ``call_seed(fqt_seed, c)`` and
stream ``ROLE_STREAMS[role]`` for SR, so a run is reproducible and every role draws its own numbers.

Sizes: in_features and out_features must be multiples of what the roles need (16 for NVFP4 1x16,
128 with 1x128 outer scales, 32 for MX): a ValueError otherwise (convert_for_training can keep such
layers unquantized instead). The token dimension T (the wgrad reduction dim) is zero-padded to a
multiple of 128 for the wgrad GEMM when it is not one already (as TetraJet-v2's layer does): zero rows
change no block's amax and add nothing to dW.

Non-finite values: the quantizers need finite input. A call whose X or W (forward) or dY (backward) is
not finite is counted in ``layer.fqt_stats`` (``nonfinite_forward`` / ``nonfinite_backward``) and runs
that GEMM unquantized, so the NaN/Inf reaches the loss or the gradients and the training loop's own
non-finite check (raise or skip) sees it. Nothing is zeroed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import can_run_triton
from ..formats import (fake_quantize, inverse_random_hadamard_transform, pad_to_multiple, random_hadamard_transform,
                       random_signs, stream_key)
from .recipe import GEMMS, HADAMARD_BLOCK, ROLES, Recipe, RoleConfig, get_recipe

ROLE_STREAMS = {role: i for i, role in enumerate(ROLES)}
FP8_STREAMS = {"x": 8, "w": 9, "dy_wgrad": 10, "x_wgrad": 11}
GEMM_SIGN_STREAMS = {gemm: 100 + i for i, gemm in enumerate(GEMMS)}
TOKEN_PAD = 128


def call_seed(layer_seed: int, call: int, rank: int = 0) -> int:
    """The seed of forward call ``call`` of a layer (31 bits); data-parallel ranks draw their own numbers."""
    seed = stream_key(int(layer_seed), int(call))
    return seed if rank == 0 else stream_key(seed, 1_000 + int(rank))


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def layer_seed(recipe_seed: int, index: int) -> int:
    """The seed of the ``index``-th quantized layer of a model under a recipe seed."""
    return stream_key(int(recipe_seed), 1_000_000 + int(index))


def hadamard_signs(recipe: Recipe, seed: int, gemm: str) -> torch.Tensor:
    """The +-1 sign vector (length 16) of ``gemm`` for a call with seed ``seed``."""
    if recipe.hadamard_signs == "fixed":
        return random_signs(HADAMARD_BLOCK, seed=stream_key(recipe.seed, GEMM_SIGN_STREAMS["wgrad"]))
    return random_signs(HADAMARD_BLOCK, seed=stream_key(seed, GEMM_SIGN_STREAMS[gemm]))


def quantize_operand(x: torch.Tensor, rc: RoleConfig, dim: int, *, seed: Optional[int] = None,
                     stream: int = 0, rounding: Optional[str] = None, backend: str = "torch") -> torch.Tensor:
    """Fake-quantize (quantize, dequantize) 2-D ``x`` along ``dim`` as role ``rc`` says; fp32 out.

    ``rc.format == "bf16"`` returns x unchanged (in fp32). The Hadamard transform is not applied here.
    backend: "torch" (fewer.formats.quantize), "triton" (fewer.formats.fused_quantize: the row-wise operand
    for dim=-1, the column-wise one for dim=0, rows zero-padded at the end where the kernel needs it, which
    leaves every element's SR stream index unchanged) or "auto" (triton on CUDA when it can run).
    """
    x = x.float()
    if not rc.quantized:
        return x
    rounding = rc.rounding if rounding is None else rounding
    if backend == "auto":
        backend = "triton" if x.is_cuda and can_run_triton(x.device).ok else "torch"
    if backend == "triton":
        return _fused_fake_quantize(x, rc, dim, rounding, seed, stream)
    kwargs = dict(dim=dim, rounding=rounding, scale_rounding=rc.formats_scale_rounding, check_finite=False)
    if rounding == "stochastic":
        kwargs.update(seed=int(seed), stream=int(stream))
    return fake_quantize(x, rc.spec_name, **kwargs).float()


def _fused_fake_quantize(x: torch.Tensor, rc: RoleConfig, dim: int, rounding: str, seed: Optional[int],
                         stream: int) -> torch.Tensor:
    from ..formats import fused_quantize, get_spec

    if x.dim() != 2:
        raise ValueError(f"the triton backend quantizes 2-D operands, got shape {tuple(x.shape)}")
    spec = get_spec(rc.spec_name)
    need = 128 if spec.second_level == "outer128" else spec.block_shape[1]
    dim = dim % 2
    rows = x.shape[0]
    if dim == 1:
        x = pad_to_multiple(x, need, 0)            # extra rows at the end: the flat index of every element is kept
    kwargs = dict(rowwise=dim == 1, colwise=dim == 0, rounding=rounding, scale_rounding=rc.formats_scale_rounding,
                  streams=(int(stream), int(stream)))
    if rounding == "stochastic":
        kwargs["seed"] = int(seed)
    row, col = fused_quantize(x.contiguous(), spec, **kwargs)
    out = (row if dim == 1 else col).dequantize(torch.float32)
    return out[:rows]


def _rht(x: torch.Tensor, signs: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    return x if signs is None else random_hadamard_transform(x, signs, block=HADAMARD_BLOCK, dim=dim)


@dataclasses.dataclass
class FQTStats:
    """Per-layer counters: training forward calls and calls with non-finite operands."""

    calls: int = 0
    nonfinite_forward: int = 0
    nonfinite_backward: int = 0


@dataclasses.dataclass
class _CallContext:
    """What one forward call needs besides the tensors (not saved in autograd's graph as tensors)."""

    recipe: Recipe
    seed: int
    stats: FQTStats
    fp8_channels: Optional[torch.Tensor] = None     # OutControl: input channels in MXFP8 (sorted), or None
    fp4_channels: Optional[torch.Tensor] = None

    def q(self, x: torch.Tensor, rc: RoleConfig, dim: int, stream: int) -> torch.Tensor:
        """quantize_operand with this call's seed and the recipe's backend."""
        return quantize_operand(x, rc, dim, seed=self.seed, stream=stream, backend=self.recipe.backend)

    def signs(self, gemm: str) -> Optional[torch.Tensor]:
        a, _ = GEMMS[gemm]
        if not getattr(self.recipe, a).hadamard:
            return None
        return hadamard_signs(self.recipe, self.seed, gemm)


def forward_operands(x: torch.Tensor, w: torch.Tensor, cc: _CallContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized forward operands Q_x(X) [T, K] and Q_w(W) [N, K], in the original basis.

    With an OutControl split, the FP4 channels are gathered (and zero-padded along K to the block
    multiple), quantized by the x / w roles; the MXFP8 channels by ``outcontrol.fp8_format``; both are
    scattered back to their columns. With a forward Hadamard transform the quantized values are rotated
    back (inverse RHT) so that the returned operands live in the original basis.
    """
    r = cc.recipe
    signs = cc.signs("fprop")
    if cc.fp8_channels is None:
        xq = cc.q(_rht(x, signs, -1), r.x, -1, ROLE_STREAMS["x"])
        wq = cc.q(_rht(w, signs, -1), r.w, -1, ROLE_STREAMS["w"])
        if signs is not None:
            xq = inverse_random_hadamard_transform(xq, signs, block=HADAMARD_BLOCK, dim=-1)
            wq = inverse_random_hadamard_transform(wq, signs, block=HADAMARD_BLOCK, dim=-1)
        return xq, wq
    oc = r.outcontrol
    i4, i8 = cc.fp4_channels, cc.fp8_channels
    k4 = i4.numel()
    m = max(r.x.block_multiple, r.w.block_multiple)
    x4 = pad_to_multiple(x[:, i4], m, 1)
    w4 = pad_to_multiple(w[:, i4], m, 1)
    if signs is not None:
        raise NotImplementedError("OutControl with a Hadamard transform on the forward GEMM is not implemented")
    x4 = cc.q(x4, r.x, -1, ROLE_STREAMS["x"])[:, :k4]
    w4 = cc.q(w4, r.w, -1, ROLE_STREAMS["w"])[:, :k4]
    fp8 = RoleConfig(format=oc.fp8_format, rounding=oc.fp8_rounding)
    x8 = cc.q(x[:, i8], fp8, -1, FP8_STREAMS["x"])
    w8 = cc.q(w[:, i8], fp8, -1, FP8_STREAMS["w"])
    xq = torch.empty_like(x, dtype=torch.float32)
    wq = torch.empty_like(w, dtype=torch.float32)
    xq[:, i4], xq[:, i8] = x4, x8
    wq[:, i4], wq[:, i8] = w4, w8
    return xq, wq


class QuantLinearFunction(torch.autograd.Function):
    """Y = Q(X) Q(W)^T with the dgrad / wgrad GEMMs on quantized operands (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_in: torch.Tensor, w: torch.Tensor, cc: _CallContext) -> torch.Tensor:
        # x_in [..., K] is viewed as [T, K] here and Y reshaped back here, so that the layer returns the
        # Function's own output (not a view of it: FSDP2 warns about views)
        ctx.cc = cc
        ctx.x_shape = x_in.shape
        x = x_in.reshape(-1, x_in.shape[-1])
        out_shape = tuple(x_in.shape[:-1]) + (w.shape[0],)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, wf = x.float(), w.float()
            ctx.fallback = not (bool(torch.isfinite(xf).all()) and bool(torch.isfinite(wf).all()))
            if ctx.fallback:
                cc.stats.nonfinite_forward += 1
                ctx.save_for_backward(xf, wf, xf)
                return torch.matmul(xf.view(out_shape[:-1] + (-1,)), wf.t()).to(x.dtype)
            xq, wq = forward_operands(xf, wf, cc)
            y = torch.matmul(xq.view(out_shape[:-1] + (-1,)), wq.t())   # a fresh [..., N] tensor, not a view
            r = cc.recipe
            x_src = xq if r.x_wgrad.source == "forward" else xf
            w_src = wq if r.w_dgrad.source == "forward" else wf
            # the raw X / W are kept only where a backward role needs them (OutControl's FP8 part reads
            # the forward FP8 values of X, which are in xq)
            ctx.save_for_backward(x_src, w_src, xq)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cc: _CallContext = ctx.cc
        x_src, w_src, xq = ctx.saved_tensors
        with torch.autocast(device_type=dy.device.type, enabled=False):
            dyf = dy.reshape(-1, dy.shape[-1]).float()
            if ctx.fallback or not bool(torch.isfinite(dyf).all()):
                if not ctx.fallback:
                    cc.stats.nonfinite_backward += 1
                dx = dyf @ w_src
                dw = dyf.t() @ x_src
                return dx.to(ctx.x_dtype).reshape(ctx.x_shape), dw.to(ctx.w_dtype), None
            dx = dgrad(dyf, w_src, cc) if ctx.needs_input_grad[0] else None
            dw = wgrad(dyf, x_src, xq, cc) if ctx.needs_input_grad[1] else None
        dx = None if dx is None else dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        return dx, (None if dw is None else dw.to(ctx.w_dtype)), None


def dgrad(dy: torch.Tensor, w_src: torch.Tensor, cc: _CallContext) -> torch.Tensor:
    """dX = Q(dY H) Q(H^T W_src): both operands quantized along N (out_features)."""
    r = cc.recipe
    signs = cc.signs("dgrad")
    a = cc.q(_rht(dy, signs, -1), r.dy_dgrad, -1, ROLE_STREAMS["dy_dgrad"])
    b = cc.q(_rht(w_src, signs, 0), r.w_dgrad, 0, ROLE_STREAMS["w_dgrad"])
    return a @ b


def wgrad(dy: torch.Tensor, x_src: torch.Tensor, xq: torch.Tensor, cc: _CallContext) -> torch.Tensor:
    """dW = Q(H dY)^T Q(H X_src): both operands quantized along T (tokens, zero-padded to 128)."""
    r = cc.recipe
    signs = cc.signs("wgrad")
    t = dy.shape[0]
    pad = TOKEN_PAD if t % TOKEN_PAD else 1
    dy_p = pad_to_multiple(dy, pad, 0)
    a = cc.q(_rht(dy_p, signs, 0), r.dy_wgrad, 0, ROLE_STREAMS["dy_wgrad"])
    if cc.fp8_channels is None:
        b = cc.q(_rht(pad_to_multiple(x_src, pad, 0), signs, 0), r.x_wgrad, 0, ROLE_STREAMS["x_wgrad"])
        return a.t() @ b
    # OutControl: FP4 columns as the recipe says; MXFP8 columns without Hadamard, from the forward FP8 X
    oc = r.outcontrol
    i4, i8 = cc.fp4_channels, cc.fp8_channels
    k4 = i4.numel()
    x4 = pad_to_multiple(pad_to_multiple(x_src[:, i4], pad, 0), max(r.x.block_multiple, r.w.block_multiple), 1)   # as in forward
    b4 = cc.q(_rht(x4, signs, 0), r.x_wgrad, 0, ROLE_STREAMS["x_wgrad"])[:, :k4]
    fp8 = RoleConfig(format=oc.fp8_format, rounding=oc.fp8_rounding)
    pad8 = TOKEN_PAD if t % 32 else 1
    x8_src = xq[:, i8] if r.x_wgrad.source == "forward" else x_src[:, i8]
    a8 = cc.q(pad_to_multiple(dy, pad8, 0), fp8, 0, FP8_STREAMS["dy_wgrad"])
    b8 = cc.q(pad_to_multiple(x8_src, pad8, 0), fp8, 0, FP8_STREAMS["x_wgrad"])
    dw = dy.new_empty((dy.shape[1], x_src.shape[1]))
    dw[:, i4] = a.t() @ b4
    dw[:, i8] = a8.t() @ b8
    return dw


def check_features(recipe: Recipe, in_features: int, out_features: int, name: str = "") -> Optional[str]:
    """None if the layer's sizes suit the recipe, else the reason."""
    need_in, need_out = recipe.feature_multiple("in"), recipe.feature_multiple("out")
    where = f"layer {name!r}: " if name else ""
    if in_features % need_in:
        return (f"{where}in_features={in_features} is not a multiple of {need_in}, the block the recipe "
                f"{recipe.label!r} needs along the forward reduction dim; pad the layer or keep it in bf16 "
                "(Recipe(unaligned='keep_bf16') or keep_bf16=...)")
    if out_features % need_out:
        return (f"{where}out_features={out_features} is not a multiple of {need_out}, the block the recipe "
                f"{recipe.label!r} needs along the data-gradient reduction dim; pad the layer or keep it in bf16 "
                "(Recipe(unaligned='keep_bf16') or keep_bf16=...)")
    if recipe.outcontrol.enabled and in_features < 2 * recipe.outcontrol.granularity:
        return (f"{where}in_features={in_features} is too small for OutControl's granularity "
                f"{recipe.outcontrol.granularity} (needs at least twice that)")
    return None


class QuantLinear(nn.Linear):
    """A drop-in nn.Linear (same parameters, same state_dict keys) that trains on quantized GEMMs.

    ``recipe``: a :class:`Recipe` or preset name. ``fqt_seed``: the layer's SR / Hadamard seed.
    OutControl and OsciReset state (channel selection, norms, counters) lives in non-persistent
    buffers and attributes, so ``state_dict`` keys equal nn.Linear's; save it with
    :func:`fewer.fqt.convert.fqt_state_dict`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Recipe | str = "tetrajet_v2", fqt_seed: int = 0, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_fqt(get_recipe(recipe), fqt_seed, name)

    def _setup_fqt(self, recipe: Recipe, fqt_seed: int, name: str) -> None:
        reason = check_features(recipe, self.in_features, self.out_features, name)
        if reason is not None:
            raise ValueError(reason)
        self.recipe = recipe
        self.fqt_seed = int(fqt_seed)
        self.fqt_name = name
        self.fqt_stats = FQTStats()
        device = self.weight.device
        self.register_buffer("fp8_channels", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("channel_norm_sum", torch.zeros(self.in_features, dtype=torch.float32, device=device),
                             persistent=False)
        self.outcontrol_recording = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | str, *, fqt_seed: int = 0,
                    name: str = "") -> "QuantLinear":
        """Wrap an existing nn.Linear's parameters (the same Parameter objects, so optimizers keep them)."""
        recipe = get_recipe(recipe)
        reason = check_features(recipe, linear.in_features, linear.out_features, name)
        if reason is not None:
            raise ValueError(reason)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup_fqt(recipe, fqt_seed, name)
        new.train(linear.training)
        return new

    # ---- OutControl split ----
    @property
    def outcontrol_selected(self) -> bool:
        return self.fp8_channels.numel() > 0

    def fp4_channels(self) -> torch.Tensor:
        mask = torch.ones(self.in_features, dtype=torch.bool, device=self.fp8_channels.device)
        mask[self.fp8_channels] = False
        return mask.nonzero().flatten()

    def _call_context(self, seed: int) -> _CallContext:
        if self.outcontrol_selected:
            return _CallContext(self.recipe, seed, self.fqt_stats, self.fp8_channels, self.fp4_channels())
        return _CallContext(self.recipe, seed, self.fqt_stats)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole fp32 weight, detached (gathered from the ranks when FSDP2 has sharded it)."""
        w = self.weight.detach()
        if hasattr(w, "full_tensor"):         # a DTensor (FSDP2 outside forward)
            w = w.full_tensor()
        return w.float()

    @torch.no_grad()
    def assign_weight(self, full: torch.Tensor) -> None:
        """Write a whole new weight into the parameter (into this rank's shard under FSDP2)."""
        param = self.weight
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            new = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(new.to_local())
        else:
            param.copy_(full.to(param.dtype))

    @torch.no_grad()
    def quantized_weight(self, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Q_w(W) as the forward uses it now (RTN; OutControl split included), fp32, W's layout.

        ``w``: the whole weight to quantize (default :meth:`full_weight`)."""
        cc = self._call_context(call_seed(self.fqt_seed, self.fqt_stats.calls))
        w = self.full_weight() if w is None else w.float()
        if not self.recipe.w.quantized:
            return w
        x_dummy = torch.zeros(1, self.in_features, device=w.device)
        if cc.fp8_channels is None and cc.signs("fprop") is None:
            return quantize_operand(w, self.recipe.w, -1, rounding="nearest", backend=self.recipe.backend)
        return forward_operands(x_dummy, w, cc)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recipe.quantizes:
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear {self.fqt_name!r}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        training_call = torch.is_grad_enabled() and self.training
        if training_call and self.outcontrol_recording:
            with torch.no_grad():
                self.channel_norm_sum += x2d.detach().float().norm(dim=0)
        seed = call_seed(self.fqt_seed, self.fqt_stats.calls, _rank())
        if training_call:
            self.fqt_stats.calls += 1
        y = QuantLinearFunction.apply(x, self.weight, self._call_context(seed))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        extra = f", outcontrol={self.fp8_channels.numel()} ch" if self.outcontrol_selected else ""
        return super().extra_repr() + f", recipe={self.recipe.label}{extra}"

"""Backend choice for the row-wise + column-wise quantization of a GEMM operand."""

from __future__ import annotations

from typing import Optional

import torch

from ..core import Capability, can_run_triton, resolve_backend
from .quantized import QuantizedTensor
from .reference import check_input, quantize
from .spec import FormatSpec, get_spec

BACKENDS = ("triton", "torch")


def _torch_ok() -> Capability:
    return Capability(True, "the PyTorch reference runs everywhere")


def quantize_rowcol(x: torch.Tensor, spec: FormatSpec | str, *, rowwise: bool = True, colwise: bool = True,
                    rounding: str = "nearest", scale_rounding: Optional[str] = None, seed: Optional[int] = None,
                    streams: tuple[int, int] = (0, 1), block_size: Optional[int] = None,
                    backend: str = "auto", check_finite: bool = True
                    ) -> tuple[Optional[QuantizedTensor], Optional[QuantizedTensor]]:
    """The two operands of a training GEMM from X [M, K]: blocks along K, and blocks along M stored as [K, M].

    backend "auto" uses the fused Triton kernel when it can run on x's device, else the reference;
    an explicit backend that cannot run raises :class:`fewer.core.BackendUnavailable`.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    check_input(x, -1, check_finite)
    if x.dim() != 2:
        raise ValueError(f"quantize_rowcol takes a 2D [M, K] matrix, got shape {tuple(x.shape)}")
    chosen = resolve_backend("formats.quantize_rowcol", backend,
                             {"triton": lambda: can_run_triton(x.device), "torch": _torch_ok})
    if chosen == "triton":
        from .triton_kernels import fused_quantize
        return fused_quantize(x, spec, rowwise=rowwise, colwise=colwise, block_size=block_size, rounding=rounding,
                              scale_rounding=scale_rounding, seed=seed, streams=streams)
    kwargs = dict(rounding=rounding, scale_rounding=scale_rounding, seed=seed, block_size=block_size,
                  check_finite=False)
    row = quantize(x, spec, dim=1, stream=streams[0], **kwargs) if rowwise else None
    col = quantize(x, spec, dim=0, stream=streams[1], **kwargs) if colwise else None
    return row, col

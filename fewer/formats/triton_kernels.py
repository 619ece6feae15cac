"""Fused Triton quantizers: amax, scale, quantize and pack, row-wise AND column-wise in one pass.

For a training GEMM operand X [M, K] one launch reads each tile of X once and writes

* the row-wise operand: blocks of ``BLOCK`` along K, codes [M, K] (FP4: [M, K/2] packed), scales
  [M, K/BLOCK] (and NVFP4 double-block outer scales [M, K/128]);
* the column-wise operand, already transposed: blocks along M, codes [K, M] (FP4: [K, M/2]),
  scales [K, M/BLOCK] (outer [K, M/128]).

Both equal :func:`fewer.formats.reference.quantize` of X along dim -1 and dim 0: the kernels
repeat its arithmetic operation for operation (bit-field binades, power-of-two steps, the same
divisions), so round-to-nearest results agree bit for bit. Stochastic rounding draws from the
same counter-based hash of (seed, source element index) as the reference, so SR agrees bit for
bit too (the requirement is only "in distribution"; tests check both).

The per-tensor NVFP4 scale needs the tensor's amax before any block can be scaled: a small amax
kernel runs first (one extra read of X) unless ``tensor_amax`` is given (delayed scaling).

The launch is registered as ``torch.ops.fewer.formats_fused_quantize`` with a fake (meta) function,
so torch.compile can trace callers. Triton is imported lazily (``import fewer`` works without it). Kernels require finite input
(NaN/Inf give unspecified codes; the public ``quantize`` checks by default).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .quantized import QuantizedTensor
from .reference import OUTER_BLOCK, SCALE_ROUNDING, nvfp4_second_level
from .rounding import stream_key
from .spec import E2M1, E4M3, E5M2, INT8_ELEMENT, FormatSpec, get_spec

_SCALE_ROUND_CODE = {"exact": 0, "nearest": 0, "floor": 0, "up": 1, "headroom": 2}
# FP8 RTN element codes through the hardware cvt (sm_89+), as explicit cvt.rn.satfinite PTX in both directions (v4;
# v3 used Triton's fp8 cast for rows, which gave wrong codes with vec = 8 on an H200). False: arithmetic everywhere.
HW_ELEMENT_CVT = True
# Register prefetch of the next tile in the persistent loop: None = the default (default_prefetch), True / False =
# forced (the benchmark's sweep).
PREFETCH = None


def default_prefetch(spec: FormatSpec, rounding: str) -> bool:
    """Off for NVFP4 RTN with a per-tensor or 1x128 second level, on elsewhere: the v4 sweep on an H200 timed both
    for every tile (benchmarks/results/nvidia-h200/formats_quantize_tiles_v4b.csv). Without it NVFP4 RTN needs 166
    instead of 215 registers (3 programs per SM instead of 2) and ran 6 % faster (nvfp4_double 5 %); INT8 / FP8 1x128
    ran 1-7 % slower without it even though the prefetch makes ptxas spill 40-44 bytes there."""
    return not (rounding == "nearest" and spec.name in ("nvfp4", "nvfp4_double"))
LAST_COMPILED = None     # the last launched compiled kernel (benchmarks read n_regs / n_spills off it)
FUSED_FORMATS = ("int8_block1d", "fp8_e4m3_block", "fp8_e5m2_block", "nvfp4", "nvfp4_2d", "nvfp4_double",
                 "mxfp4", "mxfp8", "mxfp8_e5m2")


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import _triton_impl
    return _triton_impl.amax_partial_kernel, _triton_impl.dual_quantize_kernel


_RESIDENT: dict = {}


def _resident_programs(kernel, kargs, meta, warps: int) -> int:
    """Programs per SM for the persistent grid: as many as the SM's registers hold at once."""
    key = tuple(sorted(meta.items())) + (str(kargs[0].dtype), kargs[0].device.index)
    if key not in _RESIDENT:
        compiled = kernel.warmup(*kargs, grid=(1,), **meta)
        compiled._init_handles()                 # loads the binary: n_regs comes from the driver
        n_regs = getattr(compiled, "n_regs", 0) or 255
        per_warp = -(-n_regs * 32 // 256) * 256
        _RESIDENT[key] = max(1, min(65536 // (per_warp * warps), 64 // warps, 32))
    return _RESIDENT[key]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _hardware_fp8_cvt(device: torch.device) -> bool:
    """cvt.rn.satfinite to E4M3/E5M2 exists from sm_89; the interpreter takes the arithmetic path."""
    from ..core import triton_interpreter_on
    return device.type == "cuda" and not triton_interpreter_on() and torch.cuda.get_device_capability(device) >= (8, 9)


def tensor_amax(x: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """max|x| over the whole tensor as a 0-d float32 tensor (Triton partial maxima, then a tiny torch max)."""
    amax_kernel, _ = _kernels()
    flat = x.reshape(-1)
    n = flat.numel()
    partial = torch.empty(max(1, -(-n // block)), device=x.device, dtype=torch.float32)
    amax_kernel[(partial.numel(),)](flat, partial, n, BLOCK=block)
    return partial.amax()


def _is_2d(spec: FormatSpec) -> bool:
    """Square blocks shared by both operands (nvfp4_2d: 16x16)."""
    return spec.block_shape[0] not in (None, 1)


def _scale_kind(spec: FormatSpec) -> int:
    if spec.scale_format == "fp32":
        return 0
    if spec.scale_format == "e8m0":
        return 3
    return 1 if spec.second_level == "tensor" else 2


ROWS_PER_THREAD = 16


def default_tile(spec: FormatSpec, block: int, M: int, K: int, rounding: str = "nearest") -> tuple[int, int]:
    """128 rows (8 groups of 16) x 64 columns; 128 x 128 where a block or an outer block spans 128. SR takes the
    same tiles since v4 (its cheaper stream ran fastest at 128x64 in the v4 sweep on an H200, benchmarks/formats/NOTES.md)."""
    if spec.second_level == "outer128" or block >= OUTER_BLOCK:
        return OUTER_BLOCK, OUTER_BLOCK
    return OUTER_BLOCK, max(64, block)


def default_vec(spec: FormatSpec, rounding: str, block: Optional[int] = None) -> int:
    # RTN with 1x128 blocks or outer blocks (INT8 / FP8 1x128, nvfp4_double): 8 elements per thread along K (16-byte
    # loads, half the lanes per row block); fastest in the v3 (INT8) and v4 sweeps on an H200
    block = spec.block_shape[1] if block is None else block
    if rounding == "nearest" and (block >= OUTER_BLOCK or spec.second_level == "outer128"):
        return 8
    return DEFAULT_VEC


DEFAULT_VEC = 4          # elements per thread along K: 8-byte bf16 loads, 64 elements per thread


def default_warps(BM: int, BK: int, vec: int) -> int:
    # one thread per (row group, vector along K); more threads would split the 16 rows a thread keeps
    slots = (BM // ROWS_PER_THREAD) * (BK // vec)
    return max(1, min(16, slots // 32))


# Layouts whose compiled code was found to disagree with the twin on the GPU (H200, 2026-11-27: every tile of
# the benchmark sweep checked bit for bit, benchmarks/formats/NOTES.md). Per-tensor NVFP4 gives wrong row-wise
# codes (scales right) unless the tile has 128 rows and 4 elements per thread along K; the interpreter agrees with
# the twin for every tile, so the cause is in code generation and is not found yet. Refused rather than wrong.
GPU_VALIDATED = {"nvfp4": "tiles of 128 rows with vec=4 (e.g. the default 128x64, or 128x128 with 8 warps)"}


def check_gpu_validated_layout(spec: FormatSpec, BM: int, vec: int, device: torch.device) -> None:
    if device.type == "cuda" and spec.name == "nvfp4" and not (BM == 128 and vec == 4):
        raise ValueError(f"nvfp4: tile with {BM} rows and vec={vec} is refused on CUDA: it gives wrong row-wise codes "
                         f"there (a known code-generation issue); use {GPU_VALIDATED['nvfp4']}")


def fused_quantize(x: torch.Tensor, spec: FormatSpec | str, *, rowwise: bool = True, colwise: bool = True,
                   block_size: Optional[int] = None, rounding: str = "nearest", scale_rounding: Optional[str] = None,
                   seed: Optional[int] = None, streams: tuple[int, int] = (0, 1), packed: bool = True,
                   tensor_amax_value: Optional[torch.Tensor] = None, tile: Optional[tuple[int, int]] = None,
                   num_warps: Optional[int] = None, vec: Optional[int] = None,
                   programs_per_sm: Optional[int] = None) -> tuple[Optional[QuantizedTensor], Optional[QuantizedTensor]]:
    """Quantize a 2D [M, K] matrix along K (row-wise) and along M (column-wise, stored [K, M]) in one launch.

    Returns (row_operand, col_operand); either is None when not asked for. Equals
    ``reference.quantize(x, spec, dim=-1, stream=streams[0])`` and ``(..., dim=0, stream=streams[1])``.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.name not in FUSED_FORMATS:
        raise ValueError(f"the fused Triton quantizer supports {FUSED_FORMATS}, got {spec.name!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"the fused quantizer takes a 2D [M, K] matrix, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the fused quantizer takes float32, float16 or bfloat16 input, got {x.dtype}")
    from ..core import triton_interpreter_on
    if x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreter_on()):
        raise ValueError(f"the fused Triton quantizer needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                         f"got device {x.device.type!r}")
    if tensor_amax_value is not None and tensor_amax_value.numel() != 1:
        raise ValueError(f"tensor_amax_value must hold one value, got shape {tuple(tensor_amax_value.shape)}")
    if not (rowwise or colwise):
        raise ValueError("ask for rowwise and/or colwise")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding in the kernel needs seed= (the counter-based stream; "
                         "torch.Generator streams exist only in the reference path)")
    allowed = SCALE_ROUNDING[spec.scale_format]
    scale_rounding = allowed[0] if scale_rounding is None else scale_rounding
    if scale_rounding not in allowed:
        raise ValueError(f"{spec.name} takes scale_rounding in {allowed}, got {scale_rounding!r}")
    if spec.element is E2M1 and not packed:
        raise ValueError("the fused quantizer writes FP4 packed two per byte (packed=True)")
    M, K = x.shape
    block = spec.block_shape[1] if block_size is None else block_size
    if spec.scale_format != "fp32" and block != spec.block_shape[1]:
        raise ValueError(f"{spec.name} fixes its block size to {spec.block_shape[1]}")
    if block < 2 or block & (block - 1):
        raise ValueError(f"the fused quantizer needs a power-of-two block size, got {block}")
    need = OUTER_BLOCK if spec.second_level == "outer128" else block
    if M % need or K % need:
        raise ValueError(f"{spec.name}: both dims of the [M, K] = [{M}, {K}] matrix must be multiples of {need} "
                         f"(blocks run along K for the row-wise and along M for the column-wise operand); "
                         f"pad with fewer.formats.pad_to_multiple")
    BM, BK = tile if tile is not None else default_tile(spec, block, M, K, rounding)
    if (BM % block or BK % block or BM % ROWS_PER_THREAD or BM & (BM - 1) or BK & (BK - 1)
            or (spec.second_level == "outer128" and (BM, BK) != (OUTER_BLOCK, OUTER_BLOCK))):
        raise ValueError(f"tile {(BM, BK)} must be powers of two, multiples of the block {block} and of "
                         f"{ROWS_PER_THREAD} rows (128x128 for outer128)")
    vec = default_vec(spec, rounding, block) if vec is None else vec
    if vec not in (1, 2, 4, 8) or BK % vec:
        raise ValueError(f"vec (elements per thread along K) must be 1, 2, 4 or 8 and divide BK={BK}, got {vec}")
    if block < ROWS_PER_THREAD:
        raise ValueError(f"the fused quantizer needs blocks of at least {ROWS_PER_THREAD} elements, got {block}")
    check_gpu_validated_layout(spec, BM, vec, x.device)

    amax_in = None if tensor_amax_value is None else tensor_amax_value.to(x.device, torch.float32).reshape(1)
    (row_data, row_scale, row_outer, col_data, col_scale, col_outer, amax) = _fused_op()(
        x, spec.name, rowwise, colwise, block, rounding, scale_rounding, -1 if seed is None else int(seed),
        int(streams[0]), int(streams[1]), amax_in, BM, BK, 0 if num_warps is None else int(num_warps), int(vec),
        0 if programs_per_sm is None else int(programs_per_sm))
    row_bufs = (row_data, row_scale, row_outer)
    col_bufs = (col_data, col_scale, col_outer)
    element = spec.element
    kind = _scale_kind(spec)

    outer_tensor = amax.reshape(()) if kind == 1 else None

    def wrap(bufs, dim, rows, cols):
        data, scale, outer = bufs
        if element in (E4M3, E5M2):
            data = data.view(element.storage)
        if kind in (1, 2):
            scale = scale.view(torch.float8_e4m3fn)
            outer = outer if kind == 2 else nvfp4_second_level(outer_tensor)
        else:
            outer = None
        return QuantizedTensor(data=data, scale=scale, spec=spec, original_shape=x.shape, dim=dim,
                               block=(block, block) if _is_2d(spec) else (1, block), outer_scale=outer,
                               packed=element is E2M1)

    row = wrap(row_bufs, 1, M, K) if rowwise else None
    col = wrap(col_bufs, 0, K, M) if colwise else None
    return row, col


# ---------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile can trace through the launcher with a fake)


def _output_shapes(spec: FormatSpec, M: int, K: int, block: int, rowwise: bool, colwise: bool):
    element, kind = spec.element, _scale_kind(spec)
    data_dtype = torch.int8 if element is INT8_ELEMENT else torch.uint8
    scale_dtype = torch.float32 if kind == 0 else torch.uint8
    out = []
    for wanted, rows, cols in ((rowwise, M, K), (colwise, K, M)):
        if not wanted:
            out += [((0,), data_dtype), ((0,), scale_dtype), ((0,), torch.float32)]
            continue
        out.append(((rows, cols // 2 if element is E2M1 else cols), data_dtype))
        out.append(((rows // block if _is_2d(spec) else rows, cols // block), scale_dtype))
        out.append(((rows, cols // OUTER_BLOCK) if kind == 2 else (0,), torch.float32))
    out.append(((1,) if kind == 1 else (0,), torch.float32))
    return out


def kernel_meta(spec: FormatSpec, block: int, BM: int, BK: int, vec: int, warps: int, rounding: str,
                scale_rounding: str, rowwise: bool, colwise: bool, hw: bool) -> dict:
    """The kernel's compile-time arguments (also used by benchmarks/formats/sass_count.py offline)."""
    element, kind = spec.element, _scale_kind(spec)
    hw_elem = hw and HW_ELEMENT_CVT           # FP8 RTN codes through explicit cvt PTX, both directions, any vec
    prefetch = PREFETCH if PREFETCH is not None else default_prefetch(spec, rounding)
    return dict(BM=BM, BK=BK, BLOCK=block, RPT=ROWS_PER_THREAD, VEC=vec, MANT=element.mantissa_bits or 0,
                BIAS=0 if element.is_integer else 1 - element.min_exponent,
                INTEGER=element.is_integer, PACK=element is E2M1, SIGN_SHIFT=3 if element is E2M1 else 7,
                EMAX=element.max_value, EMAXEXP=0 if element.is_integer else element.max_exponent, SCALE=kind,
                SCALE_ROUND=_SCALE_ROUND_CODE[scale_rounding], STOCHASTIC=rounding == "stochastic",
                DO_ROW=rowwise, DO_COL=colwise, HW_CVT=hw, HW_ROW=hw_elem, HW_COL=hw_elem, BLOCK2D=_is_2d(spec),
                PREFETCH=prefetch, num_warps=warps, num_stages=1)


def _launch(x, fmt, rowwise, colwise, block, rounding, scale_rounding, seed, stream_row, stream_col,
            tensor_amax_in, BM, BK, num_warps, vec, programs_per_sm):
    spec = get_spec(fmt)
    element, kind = spec.element, _scale_kind(spec)
    x = x if x.stride(1) == 1 else x.contiguous()
    M, K = x.shape
    outs = [torch.empty(shape, device=x.device, dtype=dtype)
            for shape, dtype in _output_shapes(spec, M, K, block, rowwise, colwise)]
    if kind == 1:
        outs[6] = tensor_amax(x).reshape(1) if tensor_amax_in is None else tensor_amax_in.clone()
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    args = [o if o.numel() else dummy for o in outs]
    for i in (0, 3):                         # codes are stored as 32-bit words (4 bytes, or 8 FP4 codes)
        if outs[i].numel():
            args[i] = outs[i].view(torch.int32)
    key_row = stream_key(seed, stream_row) if seed >= 0 else 0
    key_col = stream_key(seed, stream_col) if seed >= 0 else 0
    _, kernel = _kernels()
    n_tiles = -(-M // BM) * -(-K // BK)
    warps = num_warps or default_warps(BM, BK, vec)
    meta = kernel_meta(spec, block, BM, BK, vec, warps, rounding, scale_rounding, rowwise, colwise,
                       _hardware_fp8_cvt(x.device))
    table = torch.empty(256, device=x.device, dtype=torch.float32) if kind == 1 else dummy   # 1/(s_b s2), see kernel
    kargs = (x, M, K, x.stride(0), *args[:6], args[6], table, key_row, key_col)
    if x.device.type == "cuda":
        per_sm = programs_per_sm or _resident_programs(kernel, kargs, meta, warps)
        grid = (min(n_tiles, per_sm * _sm_count(x.device)),)
    else:                                # interpreter: programs_per_sm counts programs in all (tests the loop)
        grid = (min(n_tiles, programs_per_sm or n_tiles),)
    global LAST_COMPILED
    LAST_COMPILED = kernel[grid](*kargs, **meta)
    return tuple(outs)


@functools.lru_cache(maxsize=None)
def _fused_op():
    """``torch.ops.fewer.formats_fused_quantize``: 7 tensors (row data/scale/outer, col data/scale/outer, amax)."""

    @torch.library.custom_op("fewer::formats_fused_quantize", mutates_args=())
    def fused_quantize_op(x: torch.Tensor, fmt: str, rowwise: bool, colwise: bool, block: int, rounding: str,
                          scale_rounding: str, seed: int, stream_row: int, stream_col: int,
                          tensor_amax_in: Optional[torch.Tensor], BM: int, BK: int, num_warps: int, vec: int,
                          programs_per_sm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
        return _launch(x, fmt, rowwise, colwise, block, rounding, scale_rounding, seed, stream_row, stream_col,
                       tensor_amax_in, BM, BK, num_warps, vec, programs_per_sm)

    @fused_quantize_op.register_fake
    def _(x, fmt, rowwise, colwise, block, rounding, scale_rounding, seed, stream_row, stream_col,
          tensor_amax_in, BM, BK, num_warps, vec, programs_per_sm):
        M, K = x.shape
        return tuple(x.new_empty(shape, dtype=dtype)
                     for shape, dtype in _output_shapes(get_spec(fmt), M, K, block, rowwise, colwise))

    return fused_quantize_op

"""Number formats: INT8, FP8 (E4M3/E5M2), NVFP4 and MX (MXFP4/MXFP8).

Each format has a spec (:data:`SPECS`), a PyTorch reference quantizer (:func:`quantize` and the
per-format helpers) that returns a :class:`QuantizedTensor`, nearest-even and stochastic rounding,
the random Hadamard transform, and fused Triton quantizers (:func:`quantize_rowcol`) that write the
row-wise and the transposed column-wise operand of a training GEMM in one pass. See README.md.
"""

from .fp8 import cast_fp8, quantize_fp8
from .hadamard import (hadamard_matrix, inverse_random_hadamard_transform, random_hadamard_transform,
                       random_signs)
from .int8 import quantize_int8
from .mx import quantize_mx
from .nvfp4 import quantize_nvfp4, quantize_nvfp4_unbiased
from .ops import quantize_rowcol
from .quantized import QuantizedTensor, pack_fp4, unpack_fp4
from .reference import fake_quantize, pad_to_multiple, quantize
from .rounding import counter_uniform, representable_values, round_to_element, stream_key, uniform_noise
from .spec import E2M1, E4M3, E5M2, INT8_ELEMENT, SPECS, ElementFormat, FormatSpec, get_spec
from .triton_kernels import FUSED_FORMATS, fused_quantize   # triton itself is imported on first launch

__all__ = [
    "E2M1", "E4M3", "E5M2", "INT8_ELEMENT", "SPECS", "ElementFormat", "FormatSpec", "get_spec",
    "QuantizedTensor", "pack_fp4", "unpack_fp4",
    "quantize", "fake_quantize", "pad_to_multiple", "quantize_rowcol", "fused_quantize", "FUSED_FORMATS",
    "quantize_int8", "quantize_fp8", "cast_fp8", "quantize_nvfp4", "quantize_nvfp4_unbiased", "quantize_mx",
    "round_to_element", "representable_values", "uniform_noise", "counter_uniform", "stream_key",
    "hadamard_matrix", "random_signs", "random_hadamard_transform", "inverse_random_hadamard_transform",
]

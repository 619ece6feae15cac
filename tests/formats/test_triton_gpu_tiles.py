"""GPU only: every tile / vector width / grid of the benchmark sweep against the PyTorch twin, bit for bit.

The interpreter (CPU) cannot run the hardware-cvt paths (Triton's fp8 cast, explicit cvt PTX); the v3 sweep
found a layout where Triton's cast gave wrong codes, so each layout the benchmark may pick is checked here.
About 90 kernels compile on first use (minutes); `benchmarks/formats/bench_quantize.py` compiles them in parallel.
"""

import pytest
import torch

from fewer.core import has_triton
from fewer.formats import quantize

pytestmark = [pytest.mark.skipif(not has_triton(), reason="triton is not installed"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TILES = [(128, 64, 4, 4), (64, 64, 2, 4), (64, 128, 4, 4), (128, 128, 8, 4), (128, 64, 8, 2), (128, 128, 4, 8)]
TILES_128 = [(128, 128, 8, 4), (128, 128, 16, 2), (128, 128, 4, 8), (256, 128, 16, 4)]
FORMATS = ["int8_block1d", "fp8_e4m3_block", "fp8_e5m2_block", "nvfp4", "nvfp4_2d", "nvfp4_double", "mxfp4", "mxfp8",
           "mxfp8_e5m2"]


def _tiles(name):
    if name == "nvfp4":  # the other tiles are refused on CUDA (wrong row codes; test_refused_nvfp4_layouts)
        return [t for t in TILES if t[0] == 128 and t[3] == 4]
    if name == "nvfp4_double":
        return TILES_128[:3]
    return TILES_128 if name in ("int8_block1d", "fp8_e4m3_block", "fp8_e5m2_block") else TILES


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_every_tile_equals_reference_on_gpu(name, rounding):
    from fewer.formats.triton_kernels import fused_quantize
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(512, 1024, device="cuda", generator=g) * 3).to(torch.bfloat16)
    seed = 5 if rounding == "stochastic" else None
    ref_row = quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0)
    ref_col = quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1)
    for t, (BM, BK, warps, vec) in enumerate(_tiles(name)):
        for per_sm in ((None, 1 << 20) if t == 0 else (None,)):       # persistent and one-program-per-tile grids
            row, col = fused_quantize(x, name, rounding=rounding, seed=seed, tile=(BM, BK), num_warps=warps, vec=vec,
                                      programs_per_sm=per_sm)
            for got, ref in ((row, ref_row), (col, ref_col)):
                assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8)), (BM, BK, warps, vec)
                assert torch.equal(got.scale.view(torch.uint8), ref.scale.view(torch.uint8)), (BM, BK, warps, vec)

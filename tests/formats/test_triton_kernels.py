"""The fused Triton quantizers against their PyTorch twin (CPU: TRITON_INTERPRET=1; small shapes)."""

import pytest
import torch

from fewer.core import BackendUnavailable, has_triton, triton_interpreter_on
from fewer.formats import quantize, quantize_rowcol

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

FORMATS = ["int8_block1d", "fp8_e4m3_block", "fp8_e5m2_block", "nvfp4", "nvfp4_2d", "nvfp4_double", "mxfp4", "mxfp8",
           "mxfp8_e5m2"]


def _device():
    if torch.cuda.is_available():
        return "cuda"
    if not triton_interpreter_on():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cpu"


def _input(M, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g).pow(3) * 10
    x[0, 0] = 300.0                                         # an outlier row and column
    x[M // 2, :16] = 0.0                                    # an all-zero block
    x[1, 1] = -0.0
    return x.to(torch.bfloat16).to(_device())


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def _assert_same(fused, ref):
    assert fused.data.shape == ref.data.shape and fused.scale.shape == ref.scale.shape
    assert torch.equal(_bits(fused.data), _bits(ref.data))
    assert torch.equal(_bits(fused.scale), _bits(ref.scale))
    if ref.outer_scale is not None:
        assert torch.equal(fused.outer_scale.reshape(ref.outer_scale.shape), ref.outer_scale)
    assert torch.equal(fused.dequantize(), ref.dequantize())


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_rowcol_equals_reference_bit_for_bit(name, rounding):
    x = _input(128, 256)
    seed = 77 if rounding == "stochastic" else None
    row, col = quantize_rowcol(x, name, rounding=rounding, seed=seed, backend="triton")
    ref_row = quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0)
    ref_col = quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1)
    _assert_same(row, ref_row)
    _assert_same(col, ref_col)
    assert col.data.shape[0] == 256                         # column-wise operand is stored transposed


@pytest.mark.parametrize("name", ["nvfp4", "mxfp8"])
def test_awkward_shape_uses_masked_tiles(name):
    x = _input(96, 160, seed=1)                             # multiples of the block, not of the 64x64 tile
    row, col = quantize_rowcol(x, name, backend="triton")
    _assert_same(row, quantize(x, name, dim=1))
    _assert_same(col, quantize(x, name, dim=0))


@pytest.mark.parametrize("scale_rounding", ["up", "headroom"])
def test_scale_rounding_variants(scale_rounding):
    x = _input(128, 128, seed=2)
    row, _ = quantize_rowcol(x, "nvfp4_double", rounding="stochastic", seed=3, scale_rounding=scale_rounding,
                             colwise=False, backend="triton")
    _assert_same(row, quantize(x, "nvfp4_double", rounding="stochastic", seed=3, scale_rounding=scale_rounding))
    row, _ = quantize_rowcol(x, "mxfp4", scale_rounding="up", colwise=False, backend="triton")
    _assert_same(row, quantize(x, "mxfp4", scale_rounding="up"))


def test_kernel_sr_agrees_in_distribution():
    # independent of the bit-exact check: the mean of many kernel SR draws approaches x
    x = _input(64, 128, seed=4)
    draws = [quantize_rowcol(x, "nvfp4", rounding="stochastic", seed=s, scale_rounding="up", colwise=False,
                             backend="triton")[0].dequantize() for s in range(32)]
    rtn = quantize_rowcol(x, "nvfp4", colwise=False, backend="triton")[0].dequantize()
    xf = x.float()
    assert (torch.stack(draws).mean(0) - xf).norm() < 0.5 * (rtn - xf).norm()
    assert not torch.equal(draws[0], draws[1])


def test_tensor_amax_given_equals_computed():
    x = _input(64, 64, seed=5)
    row, _ = quantize_rowcol(x, "nvfp4", colwise=False, backend="triton")
    from fewer.formats.triton_kernels import fused_quantize
    given, _ = fused_quantize(x, "nvfp4", colwise=False, tensor_amax_value=x.float().abs().amax())
    _assert_same(given, row)


def test_kernel_input_errors():
    from fewer.formats.triton_kernels import fused_quantize
    dev = _device()
    with pytest.raises(ValueError, match="2D"):
        fused_quantize(torch.ones(2, 32, 32, device=dev), "nvfp4")
    with pytest.raises(ValueError, match="multiples of 16"):
        fused_quantize(torch.ones(40, 32, device=dev), "nvfp4")
    with pytest.raises(ValueError, match="multiples of 128"):
        fused_quantize(torch.ones(128, 64, device=dev), "nvfp4_double")
    with pytest.raises(ValueError, match="seed"):
        fused_quantize(torch.ones(32, 32, device=dev), "nvfp4", rounding="stochastic")
    with pytest.raises(ValueError, match="supports"):
        fused_quantize(torch.ones(32, 32, device=dev), "int8_token")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        fused_quantize(torch.ones(32, 32, device=dev, dtype=torch.int8), "nvfp4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rowcol(torch.full((32, 32), float("nan"), device=dev), "nvfp4", backend="triton")


def test_wrong_device_is_named(monkeypatch):
    from fewer.formats.triton_kernels import fused_quantize
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        fused_quantize(torch.ones(32, 32), "nvfp4")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        fused_quantize(torch.ones(32, 32, device="meta"), "nvfp4")


def test_explicit_triton_backend_never_falls_back(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        quantize_rowcol(torch.ones(32, 32), "nvfp4", backend="triton")
    row, col = quantize_rowcol(torch.ones(32, 32), "nvfp4", backend="auto")   # auto picks the reference
    assert torch.equal(row.dequantize(), torch.ones(32, 32)) and torch.equal(col.dequantize(), torch.ones(32, 32))


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_double", "mxfp8"])
def test_custom_op_fake_matches_real(name):
    # the torch.library registration: schema and fake (meta) shapes agree with the real launch
    from fewer.formats.triton_kernels import _fused_op
    x = _input(128, 128, seed=6)
    block = 16 if name.startswith("nvfp4") else 32
    args = (x, name, True, True, block, "stochastic", "nearest", 5, 0, 1, None, 128, 128, 0, 4, 0)
    torch.library.opcheck(_fused_op(), args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name,tile,vec", [("nvfp4", (64, 64), 2), ("mxfp8", (64, 128), 8), ("int8_block1d", (128, 256), 1),
                                           ("mxfp4", (32, 32), 4)])
def test_other_tiles_and_vector_widths(name, tile, vec):
    # the tile and per-thread vector width change only the layout, never a code or a scale
    from fewer.formats.triton_kernels import fused_quantize
    x = _input(128, 256, seed=7)
    for rounding, seed in (("nearest", None), ("stochastic", 11)):
        row, col = fused_quantize(x, name, rounding=rounding, seed=seed, tile=tile, vec=vec)
        _assert_same(row, quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0))
        _assert_same(col, quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1))


@pytest.mark.parametrize("name", ["nvfp4", "mxfp8", "nvfp4_double"])
def test_persistent_loop_over_tiles(name):
    # fewer programs than tiles: each program loops, prefetching its next tile (2 x 4 tiles of 64x64 or 4 of 128^2)
    from fewer.formats.triton_kernels import fused_quantize
    x = _input(128, 256, seed=8)
    tile = (128, 128) if name == "nvfp4_double" else (64, 64)
    for rounding, seed in (("nearest", None), ("stochastic", 5)):
        row, col = fused_quantize(x, name, rounding=rounding, seed=seed, tile=tile, programs_per_sm=3)
        _assert_same(row, quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0))
        _assert_same(col, quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1))


def test_nvfp4_2d_operands_are_transposes():
    # 16x16 blocks serve both GEMM operands: with RTN the column-wise operand is the row-wise one transposed
    from fewer.formats.triton_kernels import fused_quantize
    x = _input(96, 160, seed=9)                             # masked tiles
    row, col = fused_quantize(x, "nvfp4_2d", tile=(64, 64), programs_per_sm=2)
    assert row.block == (16, 16) and row.scale.shape == (6, 10) and col.scale.shape == (10, 6)
    assert torch.equal(row.scale.view(torch.uint8).T, col.scale.view(torch.uint8))
    assert torch.equal(row.dequantize(), col.dequantize())
    _assert_same(row, quantize(x, "nvfp4_2d", dim=1))
    _assert_same(col, quantize(x, "nvfp4_2d", dim=0))


def test_tile_and_vec_errors():
    from fewer.formats.triton_kernels import fused_quantize
    x = _input(64, 64)
    with pytest.raises(ValueError, match="multiples of the block"):
        fused_quantize(x, "mxfp8", tile=(16, 64))
    with pytest.raises(ValueError, match="vec"):
        fused_quantize(x, "nvfp4", tile=(64, 64), vec=3)


def test_refused_nvfp4_layouts_name_the_validated_ones():
    """Per-tensor NVFP4 tiles that gave wrong codes on the GPU are refused there, with the allowed layouts named."""
    from fewer.formats.spec import get_spec
    from fewer.formats.triton_kernels import check_gpu_validated_layout
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="128 rows with vec=4"):
        check_gpu_validated_layout(get_spec("nvfp4"), 64, 4, cuda)
    with pytest.raises(ValueError, match="vec=8"):
        check_gpu_validated_layout(get_spec("nvfp4"), 128, 8, cuda)
    check_gpu_validated_layout(get_spec("nvfp4"), 128, 4, cuda)            # validated: no error
    check_gpu_validated_layout(get_spec("mxfp4"), 64, 8, cuda)             # other formats passed every tile
    check_gpu_validated_layout(get_spec("nvfp4"), 64, 4, torch.device("cpu"))  # the interpreter is exact

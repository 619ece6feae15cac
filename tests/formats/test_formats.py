import pytest
import torch

from fewer.core import sqnr_db
from fewer.formats import (E2M1, SPECS, QuantizedTensor, fake_quantize, get_spec, pack_fp4, pad_to_multiple,
                           quantize, quantize_fp8, quantize_int8, quantize_mx, quantize_nvfp4,
                           quantize_nvfp4_unbiased, representable_values, unpack_fp4)

from .tolerances import NEAREST_SCALE_MIN_BIAS, SQNR_FLOOR_DB, UNBIASED_MAX_REL_BIAS


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_error_meets_floor(name):
    x = randn(256, 512)
    q = quantize(x, name)
    assert isinstance(q, QuantizedTensor)
    out = q.dequantize()
    assert out.shape == x.shape
    assert sqnr_db(out, x) >= SQNR_FLOOR_DB[name]
    assert name in repr(q) and "256x512" in repr(q)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "mxfp8_e5m2"])
def test_quantize_is_idempotent(name):
    # with power-of-two scales a dequantized tensor is on the grid: quantizing it again changes nothing
    # (formats with FP32 or two-level scales may move their scales by an ulp, so they are not idempotent)
    x = randn(128, 256, seed=1) * 3
    once = fake_quantize(x, name)
    assert torch.equal(fake_quantize(once, name), once)


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_double", "mxfp4", "mxfp8", "fp8_e4m3_block", "int8_block1d"])
def test_every_element_value_round_trips_exactly(name):
    spec = get_spec(name)
    values = representable_values(spec.element)
    block = spec.block_shape[1]
    # every block holds element values and its own max element: all scales come out exactly 1
    n = ((values.numel() + block - 2) // (block - 1)) * (block - 1)
    vals = values.repeat(n // values.numel() + 1)[:n].view(-1, block - 1)
    top = torch.full((vals.shape[0], 1), spec.element.max_value)
    x = torch.cat([vals, top], 1).reshape(1, -1)
    x = pad_to_multiple(x, 128, dim=1)
    x[0, -1] = spec.element.max_value                     # the padding blocks also get scale 1
    if spec.second_level == "tensor":
        x = x * 448                                        # tensor amax = 6*448 makes s2 exactly 1 ...
        x[0, :-block] /= 448                               # ... and the other blocks keep scale 1
    assert torch.equal(fake_quantize(x, name), x)


def test_nvfp4_scales_follow_the_definition():
    x = randn(4, 64, seed=2) * 5
    q = quantize_nvfp4(x)
    amax = x.abs().max()
    assert torch.equal(q.outer_scale, amax / 2688)
    blocks = x.abs().view(4, 4, 16).amax(-1)
    want = (blocks * (1 / (6 * (amax / 2688)))).clamp(max=448).to(torch.float8_e4m3fn)
    assert torch.equal(q.scale.view(torch.uint8), want.view(torch.uint8))
    assert q.data.dtype == torch.uint8 and q.data.shape == (4, 32)


def test_fp4_packing_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    x = randn(8, 32, seed=3)
    packed, unpacked = quantize_nvfp4(x), quantize_nvfp4(x, packed=False)
    assert torch.equal(unpack_fp4(packed.data), unpacked.data)
    assert torch.equal(packed.dequantize(), unpacked.dequantize())


def test_dim_choice_equals_transposed_quantization():
    x = randn(64, 96, seed=4)
    along_rows = quantize_nvfp4(x, dim=0)
    assert along_rows.data.shape == (96, 32)               # stored transposed: [K, M/2]
    assert torch.equal(along_rows.dequantize(), quantize_nvfp4(x.t().contiguous()).dequantize().t())
    x3 = randn(2, 32, 48, seed=5)
    assert torch.equal(quantize_mx(x3, dim=1).dequantize(), quantize_mx(x3.transpose(1, 2)).dequantize().transpose(1, 2))


def test_nvfp4_2d_blocks_commute_with_transpose():
    w = randn(64, 48, seed=6)
    qw = quantize_nvfp4(w, block_2d=True).dequantize()
    assert torch.equal(qw.t(), quantize_nvfp4(w.t().contiguous(), block_2d=True).dequantize())
    assert quantize_nvfp4(w, block_2d=True).scale.shape == (4, 3)


def test_double_block_has_one_fp32_scale_per_128():
    x = randn(8, 384, seed=7)
    q = quantize_nvfp4(x, second_level="outer128")
    assert q.outer_scale.shape == (8, 3) and q.outer_scale.dtype == torch.float32
    assert torch.equal(q.outer_scale, x.abs().view(8, 3, 128).amax(-1) / 2688)


def _block_max_bias(scale_rounding, draws=200):
    x = randn(32, 256, seed=8)
    is_max = x.abs() == x.abs().view(32, 16, 16).amax(-1, keepdim=True).expand(32, 16, 16).reshape(32, 256)
    mean = torch.stack([quantize_nvfp4(x, second_level="outer128", rounding="stochastic", seed=i,
                                       scale_rounding=scale_rounding).dequantize() for i in range(draws)]).mean(0)
    return ((mean[is_max] - x[is_max]) / x[is_max]).mean().item(), mean, x


def test_double_block_sr_is_unbiased_and_nearest_scales_are_not():
    bias_up, mean, x = _block_max_bias("up")
    assert abs(bias_up) < UNBIASED_MAX_REL_BIAS
    assert ((mean - x).abs().mean() / x.abs().mean()).item() < 0.02
    bias_headroom, _, _ = _block_max_bias("headroom")
    assert abs(bias_headroom) < UNBIASED_MAX_REL_BIAS
    bias_nearest, _, _ = _block_max_bias("nearest")         # TetraJet-v2 as released: block maxima clip
    assert bias_nearest < -NEAREST_SCALE_MIN_BIAS


def test_unbiased_quantizer_error_decays_like_one_over_sqrt_n():
    x = randn(32, 256, seed=9)
    errors = []
    for n in (4, 64):
        mean = torch.stack([quantize_nvfp4_unbiased(x, seed=i).dequantize() for i in range(n)]).mean(0)
        errors.append((mean - x).norm().item())
    assert errors[1] < errors[0] / 2.5                       # 1/sqrt(16) = 4x in expectation


def test_generator_path_matches_statistics_of_seed_path():
    x = randn(16, 128, seed=10)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([quantize_nvfp4_unbiased(x, generator=g).dequantize() for _ in range(200)]).mean(0)
    assert ((mean - x).abs().mean() / x.abs().mean()).item() < 0.03


def test_mx_scale_is_ocp_power_of_two():
    x = randn(4, 64, seed=11) * 10
    q = quantize_mx(x, "mxfp4")
    amax = x.abs().view(4, 2, 32).amax(-1)
    assert torch.equal(q.scale.to(torch.int32) - 127, torch.floor(torch.log2(amax)).to(torch.int32) - 2)
    assert q.scale.dtype == torch.uint8
    q8 = quantize_mx(x, "mxfp8")
    assert torch.equal(q8.scale.to(torch.int32) - 127, torch.floor(torch.log2(amax)).to(torch.int32) - 8)
    # "up" scales never clip: the largest element maps to at most 6
    up = quantize_mx(x, "mxfp4", scale_rounding="up")
    assert (x.abs().view(4, 2, 32) / torch.ldexp(torch.ones(4, 2, 1), up.scale.to(torch.int32).view(4, 2, 1) - 127)).max() <= 6


def test_zero_blocks_and_zero_tensor():
    x = torch.zeros(2, 128)
    x[0, :16] = randn(16, seed=12)
    for name in ("nvfp4", "nvfp4_double", "mxfp4", "mxfp8", "int8_token", "fp8_e4m3_block"):
        out = fake_quantize(x, name)
        assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0, 16:] == 0).all()
    assert torch.equal(fake_quantize(torch.zeros(4, 32), "nvfp4"), torch.zeros(4, 32))
    assert quantize_mx(torch.zeros(1, 32)).scale.item() == 0


def test_int8_granularities_scale_shapes():
    x = randn(256, 64, seed=13)
    assert quantize_int8(x, "tensor").scale.shape == (1, 1)
    assert quantize_int8(x, "token").scale.shape == (256, 1)
    assert quantize_int8(x, "channel").scale.shape == (1, 64)
    assert quantize_int8(x, "block", block_size=64).scale.shape == (4, 1)
    q = quantize_int8(x, "channel")
    assert torch.equal(q.scale[0], x.abs().amax(0) / 127)
    assert q.data.dtype == torch.int8 and q.data.abs().max() <= 127


def test_fp8_formats_and_granularities():
    x = randn(64, 256, seed=14)
    for fmt in ("e4m3", "e5m2"):
        for gran in ("tensor", "channel", "block"):
            q = quantize_fp8(x, fmt, gran, block_size=64)
            assert q.data.dtype == (torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2)
    assert quantize_fp8(x, "e4m3", "block", block_size=64).scale.shape == (64, 4)


def test_bf16_and_fp16_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(32, 64, seed=15, dtype=dtype)
        out = fake_quantize(x, "nvfp4")
        assert out.dtype == dtype and sqnr_db(out.float(), x.float()) > SQNR_FLOOR_DB["nvfp4"] - 1


def test_sizes_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="multiple of the block 1x16"):
        quantize_nvfp4(randn(4, 40))
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_nvfp4(randn(4, 64), second_level="outer128")
    with pytest.raises(ValueError, match="multiple"):
        quantize_mx(randn(3, 48))
    padded = pad_to_multiple(randn(4, 40, seed=16), 16)
    assert padded.shape == (4, 48) and (padded[:, 40:] == 0).all()
    assert sqnr_db(fake_quantize(padded, "nvfp4")[:, :40], padded[:, :40]) > SQNR_FLOOR_DB["nvfp4"] - 1


def test_bad_input_is_rejected_with_the_requirement():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(4, 16, dtype=torch.int32), "nvfp4")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(4, 16, dtype=torch.float64), "nvfp4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[float("nan")] * 16]), "nvfp4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[float("inf")] * 32]), "mxfp8")
    with pytest.raises(ValueError, match="out of range"):
        quantize(randn(4, 16), "nvfp4", dim=2)
    with pytest.raises(ValueError, match="unknown format"):
        quantize(randn(4, 16), "nvfp5")
    with pytest.raises(ValueError, match="only used by rounding='stochastic'"):
        quantize(randn(4, 16), "nvfp4", seed=1)
    with pytest.raises(ValueError, match="generator"):
        quantize(randn(4, 16), "nvfp4", rounding="stochastic")
    with pytest.raises(ValueError, match="scale_rounding"):
        quantize(randn(4, 32), "mxfp4", scale_rounding="nearest")
    with pytest.raises(ValueError, match="block shape"):
        quantize(randn(4, 32), "mxfp4", block_size=16)
    with pytest.raises(ValueError, match="2D weight"):
        quantize_nvfp4(randn(2, 16, 16), block_2d=True)
    with pytest.raises(ValueError, match="granularity"):
        quantize_int8(randn(4, 16), "row")
    with pytest.raises(ValueError, match="0-d"):
        quantize(torch.tensor(1.0), "int8_tensor")


def test_quantized_tensor_repr_and_bytes():
    q = quantize_nvfp4(randn(16, 64, seed=17))
    text = repr(q)
    assert "nvfp4" in text and "e2m1" in text and "1x16" in text and "packed" in text and "4.53 bits/value" in text
    assert q.nbytes() == 16 * 32 + 16 * 4 + 4
    assert get_spec("nvfp4").element is E2M1

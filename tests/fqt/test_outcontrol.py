import pytest
import torch

from fewer.formats import fake_quantize
from fewer.fqt import (FQTController, OutControlConfig, QuantLinear, call_seed, convert_for_training, energy_share,
                       get_recipe, jaccard, n_outlier_channels, select_channels)
from fewer.fqt.linear import ROLE_STREAMS

from .helpers import fq, rht

K, N, T = 256, 128, 128


def test_channel_count():
    cfg = OutControlConfig()
    assert n_outlier_channels(256, cfg) == 32
    assert n_outlier_channels(512, cfg) == 64
    assert n_outlier_channels(128, cfg) == 32
    assert n_outlier_channels(1024, cfg.replace(granularity=128)) == 128
    assert n_outlier_channels(2048, cfg) == 192           # round(204.8 / 32) * 32


def test_select_channels_ties_and_errors():
    sums = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0])
    assert select_channels(sums, 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="k="):
        select_channels(sums, 5)
    assert jaccard(torch.tensor([1, 2]), torch.tensor([2, 3])) == pytest.approx(1 / 3)


def _outlier_x(channels: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    x = torch.randn(T, K)
    x[:, channels] *= scale
    return x


def test_selects_the_outlier_channels_in_the_window_only():
    torch.manual_seed(3)
    recipe = get_recipe("tetrajet_v2_outcontrol").replace(
        outcontrol=OutControlConfig(enabled=True, record_start=3, record_iters=4))
    model = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
    report = convert_for_training(model, recipe, keep_bf16=())
    layer = report.converted["0"]
    ctrl = FQTController(report)
    true = torch.sort(torch.randperm(K)[:32]).values
    decoy = torch.sort(torch.randperm(K)[:32]).values
    recording = []
    for step in range(1, 10):
        recording.append(layer.outcontrol_recording)
        x = _outlier_x(decoy if step in (1, 2, 7, 8, 9) else true)      # outside the window: other channels
        model(x).sum().backward()
        ctrl.after_step(step)
        if step < 6:
            assert not layer.outcontrol_selected
    assert recording == [False, False, True, True, True, True, False, False, False]
    assert ctrl.outcontrol.selected_at == 6
    assert torch.equal(layer.fp8_channels, true)
    assert energy_share(_outlier_x(true), layer.fp8_channels) > 0.9
    assert ctrl.report()["outcontrol"]["channels"] == {"0": 32}


def test_split_gemms_equal_explicit_reference():
    torch.manual_seed(4)
    recipe = get_recipe("tetrajet_v2_outcontrol")
    layer = QuantLinear(K, N, bias=False, recipe=recipe, fqt_seed=9)
    i8 = torch.sort(torch.randperm(K)[:32]).values
    layer.fp8_channels = i8
    mask = torch.ones(K, dtype=torch.bool)
    mask[i8] = False
    i4 = mask.nonzero().flatten()
    x, g = _outlier_x(i8), torch.randn(T, N)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(g)
    w = layer.weight.detach()
    seed = call_seed(9, 0)

    def fq4(t, role):
        rc = getattr(recipe, role)
        kw = dict(seed=seed, stream=ROLE_STREAMS[role]) if rc.rounding == "stochastic" else {}
        padded = torch.cat([t, t.new_zeros(t.shape[0], 256 - t.shape[1])], 1)     # gathered, zero-padded to 128s
        return fake_quantize(padded, "nvfp4_double", rounding=rc.rounding, scale_rounding=rc.formats_scale_rounding,
                             **kw)[:, :t.shape[1]]

    x4, w4 = fq4(x[:, i4], "x"), fq4(w[:, i4], "w")
    x8, w8 = fake_quantize(x[:, i8], "mxfp8"), fake_quantize(w[:, i8], "mxfp8")
    ry = x4 @ w4.t() + x8 @ w8.t()
    torch.testing.assert_close(y.detach(), ry, rtol=1e-6, atol=1e-5)
    # dW of the outlier columns: MXFP8 dY^T and the forward MXFP8 X, no Hadamard
    rdw8 = fake_quantize(g, "mxfp8", dim=0).t() @ fake_quantize(x8, "mxfp8", dim=0)
    torch.testing.assert_close(layer.weight.grad[:, i8], rdw8, rtol=1e-6, atol=1e-4)
    # dW of the other columns: NVFP4 with RHT and SR, on the forward FP4 X (gathered, padded to 128 columns)
    a = fq(rht(g, recipe, seed, "wgrad", "dy_wgrad", 0), recipe.dy_wgrad, 0, seed, "dy_wgrad")
    x4p = torch.cat([x4, x4.new_zeros(T, 256 - x4.shape[1])], 1)
    b = fq(rht(x4p, recipe, seed, "wgrad", "x_wgrad", 0), recipe.x_wgrad, 0, seed, "x_wgrad")[:, :x4.shape[1]]
    torch.testing.assert_close(layer.weight.grad[:, i4], a.t() @ b, rtol=1e-6, atol=1e-4)
    # dX stays NVFP4 throughout, on the combined forward-quantized W (FP4 and FP8 columns)
    wq = torch.empty_like(w)
    wq[:, i4], wq[:, i8] = w4, w8
    a = fq(rht(g, recipe, seed, "dgrad", "dy_dgrad", -1), recipe.dy_dgrad, -1, seed, "dy_dgrad")
    b = fq(rht(wq, recipe, seed, "dgrad", "w_dgrad", 0), recipe.w_dgrad, 0, seed, "w_dgrad")
    torch.testing.assert_close(xr.grad, a @ b, rtol=1e-6, atol=1e-5)


def test_outcontrol_lowers_forward_error_on_outlier_channels():
    torch.manual_seed(5)
    i8 = torch.sort(torch.randperm(K)[:32]).values
    x = torch.randn(T, K)
    x[:, i8] *= 50.0
    x[:, i8] += 30.0 * torch.randn(1, 32)
    plain = QuantLinear(K, N, bias=False, recipe="tetrajet_v2")
    split = QuantLinear(K, N, bias=False, recipe="tetrajet_v2_outcontrol")
    split.load_state_dict(plain.state_dict())
    split.fp8_channels = i8
    exact = x @ plain.weight.detach().t()
    with torch.no_grad():
        e_plain = float((plain(x) - exact).norm() / exact.norm())
        e_split = float((split(x) - exact).norm() / exact.norm())
    assert e_split < 0.7 * e_plain, (e_split, e_plain)

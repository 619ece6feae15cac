import math

import pytest
import torch
from torch import nn

from fewer.fqt import QuantLinear, RoleConfig, call_seed, get_recipe
from fewer.fqt.diagnostics import bias_curve
from fewer.fqt.recipe import Recipe

from .helpers import reference

T, K, N = 200, 256, 128          # T not a multiple of 128: the wgrad padding is exercised


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("preset", ["nvfp4_naive", "nvidia_nvfp4", "tetrajet_v2", "tetrajet_v2_released"])
def test_gradients_equal_explicit_reference(preset):
    recipe = get_recipe(preset, seed=7)
    layer = QuantLinear(K, N, bias=False, recipe=recipe, fqt_seed=1234)
    x, g = torch.randn(T, K), torch.randn(T, N)
    for call in range(2):                         # the second call uses the next seed
        y, dx, dw = _run(layer, x, g)
        ry, rdx, rdw = reference(x, layer.weight.detach(), g, recipe, call_seed(1234, call))
        assert torch.equal(y, ry)
        torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dw, rdw, rtol=1e-6, atol=1e-6)
    assert layer.fqt_stats.calls == 2


def test_same_seed_same_gradients_and_calls_differ():
    recipe = get_recipe("tetrajet_v2")
    x, g = torch.randn(T, K), torch.randn(T, N)
    a = QuantLinear(K, N, recipe=recipe, fqt_seed=5)
    b = QuantLinear(K, N, recipe=recipe, fqt_seed=5)
    b.load_state_dict(a.state_dict())
    ga1, gb1 = _run(a, x, g), _run(b, x, g)
    assert all(torch.equal(u, v) for u, v in zip(ga1, gb1))
    ga2 = _run(a, x, g)
    assert torch.equal(ga1[0], ga2[0])            # RTN forward: deterministic
    assert not torch.equal(ga1[2], ga2[2])        # SR backward: a new seed per call


def test_bf16_preset_is_nn_linear_exactly():
    ref = nn.Linear(K, N)
    layer = QuantLinear.from_linear(nn.Linear(K, N), "bf16")
    layer.load_state_dict(ref.state_dict())
    assert list(layer.state_dict()) == list(ref.state_dict())
    x, g = torch.randn(3, 17, K), torch.randn(3, 17, N)
    y1, dx1, dw1 = _run(ref, x, g)
    y2, dx2, dw2 = _run(layer, x, g)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    assert torch.equal(ref.bias.grad, layer.bias.grad)


def test_state_dict_keys_and_bias():
    ref = nn.Linear(K, N)
    layer = QuantLinear.from_linear(ref, "tetrajet_v2")
    assert layer.weight is ref.weight and layer.bias is ref.bias
    assert list(layer.state_dict()) == ["weight", "bias"]
    x, g = torch.randn(T, K), torch.randn(T, N)
    y, _, _ = _run(layer, x, g)
    ry, _, _ = reference(x, layer.weight.detach(), g, layer.recipe, call_seed(0, 0))
    torch.testing.assert_close(y, ry + layer.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_hadamard_cancels_in_exact_arithmetic():
    rht = RoleConfig(hadamard=True)
    recipe = Recipe(dy_dgrad=rht, w_dgrad=rht, dy_wgrad=rht, x_wgrad=rht)   # rotate, do not quantize
    layer = QuantLinear(K, N, bias=False, recipe=recipe)
    ref = nn.Linear(K, N, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x, g = torch.randn(T, K), torch.randn(T, N)
    _, dx, dw = _run(layer, x, g)
    _, rdx, rdw = _run(ref, x, g)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-4)


def test_quantization_error_is_nvfp4_sized():
    layer = QuantLinear(K, N, bias=False, recipe="tetrajet_v2")
    ref = nn.Linear(K, N, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x, g = torch.randn(T, K), torch.randn(T, N)
    for q, r in zip(_run(layer, x, g), _run(ref, x, g)):
        rel = float((q - r).norm() / r.norm())
        assert 0.01 < rel < 0.35, rel                 # quantized, but not broken


@pytest.mark.parametrize("shape, match", [((100, 128), "in_features=100"), ((128, 72), "out_features=72"),
                                          ((192, 128), "multiple of 128")])
def test_unaligned_features_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear(*shape, recipe="tetrajet_v2")
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(nn.Linear(*shape), "tetrajet_v2", name="blocks.0.fc")


def test_naive_accepts_multiples_of_16():
    layer = QuantLinear(48, 32, recipe="nvfp4_naive")
    _run(layer, torch.randn(5, 48), torch.randn(5, 32))


def test_nonfinite_gradients_are_counted_not_zeroed():
    layer = QuantLinear(K, N, bias=False, recipe="tetrajet_v2")
    x, g = torch.randn(T, K), torch.randn(T, N)
    g[3, 5] = float("nan")
    _, dx, dw = _run(layer, x, g)
    assert layer.fqt_stats.nonfinite_backward == 1
    assert torch.isnan(dx[3]).any() and torch.isnan(dw[5]).any()
    assert torch.isfinite(dx[4]).all()                # the other rows are the plain product, not zeros
    x[0, 0] = float("inf")
    y, _, _ = _run(layer, x, torch.randn(T, N))
    assert layer.fqt_stats.nonfinite_forward == 1 and not torch.isfinite(y[0]).all()


def test_tetrajet_backward_is_unbiased():
    ns = [1, 16, 100]
    errs = bias_curve(get_recipe("tetrajet_v2"), ns)
    for which in (0, 1):
        e1 = errs[1][which]
        for n in ns[1:]:
            ratio = errs[n][which] * math.sqrt(n) / e1      # 1 for an unbiased estimator (up to noise)
            assert 0.5 < ratio < 1.6, (which, n, errs)


def test_biased_backward_plateaus():
    # NVIDIA-style wgrad: X^T re-quantized with RTN from the unquantized X: biased w.r.t. the quantized graph
    biased = get_recipe("tetrajet_v2").with_roles(("x_wgrad",), rounding="nearest", source="master")
    ns = [1, 64]
    errs = bias_curve(biased, ns)
    assert errs[64][1] > 3 * errs[1][1] / math.sqrt(64), errs     # dW: bias dominates, no 1/sqrt(N) decay
    assert errs[64][0] < 2 * errs[1][0] / math.sqrt(64), errs     # dX unchanged: still unbiased

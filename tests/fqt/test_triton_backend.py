"""The fused Triton quantizers (fewer.formats.fused_quantize) give the layer the same values as the
PyTorch reference, bit for bit: CPU through the interpreter (TRITON_INTERPRET=1), or a GPU."""

import pytest
import torch

from fewer.core import can_run_triton, has_triton
from fewer.fqt import QuantLinear, get_recipe

pytestmark = pytest.mark.skipif(not has_triton().ok, reason="triton is not installed")


def _device():
    if torch.cuda.is_available() and can_run_triton("cuda").ok:
        return "cuda"
    if can_run_triton("cpu").ok:
        return "cpu"
    pytest.skip("needs a GPU or TRITON_INTERPRET=1")


def _grads(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("preset", ["tetrajet_v2", "nvidia_nvfp4", "nvfp4_naive", "tetrajet_v2_outcontrol"])
def test_triton_backend_equals_torch(preset):
    device = _device()
    t, k, n = 96, 128, 128                       # T = 96: the kernels' row padding is exercised
    x, g = torch.randn(t, k, device=device), torch.randn(t, n, device=device)
    layers = []
    for backend in ("torch", "triton"):
        layer = QuantLinear(k, n, bias=False, recipe=get_recipe(preset, backend=backend), fqt_seed=77).to(device)
        if layers:
            layer.load_state_dict(layers[0].state_dict())
        if get_recipe(preset).outcontrol.enabled:
            layer.fp8_channels = torch.arange(0, 128, 4, device=device)
        layers.append(layer)
    for a, b in zip(_grads(layers[0], x, g), _grads(layers[1], x, g)):
        assert torch.equal(a, b)

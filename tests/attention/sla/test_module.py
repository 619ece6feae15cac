"""SparseLinearAttention as a module, the sdpa backend route and the model converters."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fewer.attention import reference_attention, sdpa
from fewer.attention.sla import (SLAConfig, SparseLinearAttention, convert_attention_, convert_to_sla_,
                                 projection_parameters, sla_modules, sparse_only_reference)
from fewer.core import rel_l2

CFG = SLAConfig(block_q=16, block_k=16, topk=0.25, negligible=0.25, backend="reference")


def test_fresh_module_is_sparse_only_attention():
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    attn = SparseLinearAttention(16, CFG)
    assert attn.proj.weight.abs().max() == 0 and attn.proj.bias.abs().max() == 0
    assert rel_l2(attn(q, k, v), sparse_only_reference(q, k, v, CFG)) < 1e-7
    assert 0 < attn.last_density() < 1
    with pytest.raises(ValueError, match="head_dim 16"):
        attn(q[..., :8], k[..., :8], v[..., :8])


def _dit():
    dit = pytest.importorskip("fewer.models.dit")
    cfg = dit.DiTConfig(input_size=16, patch_size=2, dim=64, depth=2, heads=2, num_classes=10)  # 64 tokens
    return dit, dit.DiT(cfg)


def test_convert_dit_keeps_names_starts_as_sparse_only_and_trains_proj():
    dit, model = _dit()
    model.eval()  # no class dropout: both runs must see the same labels
    torch.manual_seed(0)
    with torch.no_grad():  # DiT zero-initialises its adaLN gates; a trained model has none at zero
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    x = torch.randn(2, 1, 16, 16)
    t = torch.rand(2)
    y = torch.tensor([1, 2])
    dense_state = model.state_dict()
    converted = convert_to_sla_(model, CFG)
    assert len(converted) == 2 and len(sla_modules(model)) == 2
    missing, unexpected = model.load_state_dict(dense_state, strict=False)
    assert unexpected == [] and all(".sla.proj." in name for name in missing)

    # at conversion, the model equals the dense model with sparse-only attention
    out = model(x, t, y)
    calls = []

    def sparse_only_backend(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return sparse_only_reference(q, k, v, CFG)

    with torch.no_grad():
        expected = _run_with_patched_attention(model, sparse_only_backend, x, t, y)
    assert calls and rel_l2(out, expected) < 1e-6

    out.square().mean().backward()
    grads = [p.grad for p in projection_parameters(model)]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="converted twice"):
        convert_attention_(next(m for m in model.modules() if hasattr(m, "sla")), 32, CFG)


def _run_with_patched_attention(model, fn, x, t, y):
    """Run ``model`` with each SLA-converted layer's sdpa replaced by ``fn`` (an independent path)."""
    import fewer.models.dit as dit_module
    original = dit_module.sdpa
    dit_module.sdpa = lambda q, k, v, *a, **kw: fn(q, k, v)
    try:
        layers = [m for m in model.modules() if hasattr(m, "sla")]
        saved = [type(m) for m in layers]
        for m in layers:
            m.__class__ = type(m).__mro__[1]  # the unconverted class: plain sdpa call
        return model(x, t, y)
    finally:
        dit_module.sdpa = original
        for m, cls in zip(layers, saved):
            m.__class__ = cls


class TorchSDPAAttention(nn.Module):
    """A third-party style layer that calls torch's F.scaled_dot_product_attention directly."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)


def test_convert_any_model_through_torch_sdpa_patch():
    model = nn.Sequential(TorchSDPAAttention(), nn.Linear(32, 32))
    x = torch.randn(2, 50, 32)
    dense = model(x)
    convert_to_sla_(model, CFG, patch_torch_sdpa=True)
    layer = model[0]
    torch.nn.init.normal_(layer.sla.proj.weight)
    out = model(x)
    q, k, v = layer.qkv(x).view(2, 50, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expect = layer.sla(q, k, v).transpose(1, 2).reshape(2, 50, 32)
    assert rel_l2(out, model[1](expect)) < 1e-6
    assert rel_l2(out, dense) > 1e-3
    # outside the converted layer, torch's SDPA is untouched
    assert F.scaled_dot_product_attention.__module__.startswith("torch")


def test_use_backend_routes_sdpa_calls_to_a_module():
    from fewer.attention import use_backend
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    attn = SparseLinearAttention(16, CFG)
    torch.nn.init.normal_(attn.proj.weight)
    with use_backend("sla", attn):
        out = sdpa(q, k, v)
    assert rel_l2(out, attn(q, k, v)) < 1e-7
    assert rel_l2(sdpa(q, k, v), reference_attention(q, k, v)) < 1e-5

"""patch_sdpa (route F.scaled_dot_product_attention through fewer) and the transformers registration."""

import pytest
import torch
import torch.nn.functional as F

from fewer.attention.patch import apply_patch, patch_sdpa, register_transformers
from fewer.attention.sage import SageConfig
from fewer.core import cos_sim, rel_l1

TWIN = SageConfig(kernel="torch")


class Block(torch.nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, mask=None):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2).flatten(2)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.ModuleList([Block(), Block()])
        self.decoder = Block()

    def forward(self, x, mask=None):
        for blk in self.encoder:
            x = x + blk(x)
        return x + self.decoder(x, mask)


def _net_and_input():
    torch.manual_seed(0)
    return Net().to(torch.bfloat16), torch.randn(2, 100, 64, dtype=torch.bfloat16)


def test_patch_routes_every_call_and_restores():
    net, x = _net_and_input()
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        plain = net(x)
        with patch_sdpa(net, config=TWIN) as stats:
            patched = net(x)
    assert F.scaled_dot_product_attention is original
    assert stats.routed == 3 and stats.excluded == 0
    assert not torch.equal(patched, plain)  # it really ran the quantized kernel
    assert cos_sim(patched, plain) > 0.999 and rel_l1(patched, plain) < 0.02


def test_exclude_layers_by_pattern_and_predicate():
    net, x = _net_and_input()
    with torch.no_grad():
        with patch_sdpa(net, config=TWIN, exclude=["decoder"]) as stats:
            net(x)
        assert (stats.routed, stats.excluded) == (2, 1)
        with patch_sdpa(net, config=TWIN, exclude=lambda name: name.startswith("encoder.")) as stats:
            net(x)
        assert (stats.routed, stats.excluded) == (1, 2)
        with patch_sdpa(net, config=TWIN, exclude=["*"]) as stats:
            out = net(x)
        assert stats.routed == 0 and torch.equal(out, net(x))
    for module in net.modules():  # the hooks are gone
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_unsupported_call_raises_unless_fallback_is_asked_for():
    net, x = _net_and_input()
    mask = torch.ones(100, 100, dtype=torch.bool).tril()
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="attn_mask"):
            with patch_sdpa(net, config=TWIN):
                net(x, mask)
        with patch_sdpa(net, config=TWIN, fallback=True) as stats:
            net(x, mask)
    assert stats.routed == 2 and sum(stats.fallbacks.values()) == 1
    assert "attn_mask" in next(iter(stats.fallbacks))


def test_patch_to_a_torch_backend_does_not_recurse():
    q = k = v = torch.randn(1, 2, 10, 16)
    patch = apply_patch(backend="torch")
    try:
        out = F.scaled_dot_product_attention(q, k, v)
    finally:
        patch.remove()
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v))
    assert patch.stats.routed == 1


def test_exclude_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        apply_patch(exclude=["x"])


# ------------------------------------------------------------------ transformers

def _tiny_llama(attn_implementation):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.config._attn_implementation = attn_implementation
    return model


def test_transformers_llama_logits_match_sdpa():
    name = register_transformers("fewer_sage_test", config=TWIN)
    model = _tiny_llama("sdpa")
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()
        model.config._attn_implementation = name
        for layer in model.model.layers:
            layer.self_attn.config._attn_implementation = name
        out = model(ids).logits.float()
    assert not torch.equal(out, ref)
    assert cos_sim(out, ref) > 0.999 and rel_l1(out, ref) < 0.03


def test_transformers_padding_mask_raises():
    name = register_transformers("fewer_sage_test", config=TWIN)
    model = _tiny_llama(name)
    ids = torch.randint(0, 256, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="attention_mask"):
        model(ids, attention_mask=mask)


def test_patch_on_transformers_sdpa_model():
    model = _tiny_llama("sdpa")
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref = model(ids).logits.float()
        with patch_sdpa(model, config=TWIN, exclude=["model.layers.1.*"]) as stats:
            out = model(ids).logits.float()
    assert (stats.routed, stats.excluded) == (1, 1)
    assert cos_sim(out, ref) > 0.999

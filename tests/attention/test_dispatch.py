import pytest
import torch

from fewer.attention import available_backends, reference_attention, sdpa, use_backend
from fewer.core import BackendUnavailable, rel_l1


def _qkv(b=2, hq=4, hk=2, lq=37, lk=53, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hk, lk, d, dtype=dtype),
            torch.randn(b, hk, lk, d, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa_fp64(causal):
    q, k, v = (t.double() for t in _qkv())
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    out = reference_attention(q, k, v, is_causal=causal, enable_gqa=True, compute_dtype=torch.float64)
    assert rel_l1(out, ref) < 1e-12


def test_masks_and_lse():
    q, k, v = _qkv(hq=2, hk=2)
    mask = torch.rand(q.shape[-2], k.shape[-2]) > 0.3
    mask[:, 0] = True
    out, lse = reference_attention(q, k, v, attn_mask=mask, return_lse=True)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_l1(out, expect) < 1e-5
    scores = (q @ k.transpose(-2, -1)) / 4.0
    assert torch.allclose(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1), atol=1e-5)


def test_sdpa_backends_agree_on_cpu():
    q, k, v = _qkv()
    base = sdpa(q, k, v, enable_gqa=True, is_causal=True)
    for name in ("reference", "math"):
        assert rel_l1(sdpa(q, k, v, enable_gqa=True, is_causal=True, backend=name), base) < 1e-5


def test_explicit_gpu_backend_on_cpu_raises_with_reason():
    q, k, v = _qkv(hk=4)
    with pytest.raises(BackendUnavailable, match="cudnn.*needs CUDA"):
        sdpa(q, k, v, backend="cudnn")


def test_use_backend_context_sets_auto_choice():
    q, k, v = _qkv(hk=4)
    assert "reference" in available_backends()
    with use_backend("reference"):
        out = sdpa(q, k, v)
    assert rel_l1(out, reference_attention(q, k, v)) == 0.0
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_backend("nope"):
            pass


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q, k, v.double()), "share a dtype"),
    (lambda q, k, v: (q, k[..., :8], v), "head dims differ"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "lengths differ"),
    (lambda q, k, v: (q, k[:, :2], v[:, :2]), "enable_gqa=True"),
    (lambda q, k, v: (q[0, 0, 0], k, v), "at least 3 dims"),
])
def test_bad_inputs_get_clear_errors(bad, match):
    q, k, v = _qkv(hk=4)
    with pytest.raises(ValueError, match=match):
        sdpa(*bad(q, k, v))


def test_unknown_backend_and_config_on_torch_backend():
    q, k, v = _qkv(hk=4)
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'"):
        sdpa(q, k, v, backend="fastest")
    with pytest.raises(ValueError, match="take no config"):
        sdpa(q, k, v, backend="torch", config=object())

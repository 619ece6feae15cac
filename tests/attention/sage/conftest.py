import pytest
import torch


def make_qkv(b=1, hq=2, hk=2, lq=200, lk=200, d=64, *, dtype=torch.bfloat16, v_bias=2.0, k_bias=0.0,
             qk_gain=1.0, q_outlier=0.0, v_gain=1.0, seed=0):
    """Random attention inputs, [B, H, L, D]. V carries a per-channel bias unless v_bias=0 (see tolerances.py)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g) * qk_gain
    k = torch.randn(b, hk, lk, d, generator=g) * qk_gain
    v = torch.randn(b, hk, lk, d, generator=g)
    if k_bias:
        k = k + k_bias * torch.randn(d, generator=g)
    if v_bias:
        v = v + v_bias * torch.randn(d, generator=g)
    if q_outlier:  # a few channels with a large offset shared by all tokens (LLM-style outlier channels)
        q[..., :4] += q_outlier * torch.randn(4, generator=g).sign()
    v = v * v_gain
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def qkv_factory():
    return make_qkv

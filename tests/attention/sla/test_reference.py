"""The PyTorch reference of SLA: block scoring, classification, the two branches, gradients, errors."""

import math

import pytest
import torch

from fewer.attention import reference_attention, sdpa
from fewer.attention.sla import (SLAConfig, SparseLinearAttention, compressed_attention_map, density,
                                 linear_only_reference, plan_blocks, sla_parts, sparse_linear_attention_reference)
from fewer.attention.sla.reference import (CRITICAL, MARGINAL, NEGLIGIBLE, apply_feature_map, pool_blocks,
                                           sla_parts_reference, token_masks)
from fewer.core import ConfigError, rel_l2

from .tolerances import TOLERANCES


def _qkv(b=2, h=3, lq=70, lk=53, d=16, dtype=torch.float64):
    return (torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, h, lk, d, dtype=dtype),
            torch.randn(b, h, lk, d, dtype=dtype))


def test_pool_blocks_averages_real_tokens_of_the_ragged_tail():
    x = torch.randn(2, 3, 37, 5, dtype=torch.float64)
    pooled = pool_blocks(x, 16)
    assert pooled.shape == (2, 3, 3, 5)
    for i, (lo, hi) in enumerate(((0, 16), (16, 32), (32, 37))):
        torch.testing.assert_close(pooled[:, :, i], x[:, :, lo:hi].mean(-2).float())


@pytest.mark.parametrize("smooth_k", [False, True])
def test_compressed_map_is_softmax_of_pooled_scores(smooth_k):
    q, k, _ = _qkv()
    cfg = SLAConfig(block_q=16, block_k=8, smooth_k=smooth_k)
    pmap = compressed_attention_map(q, k, cfg)
    kk = k - k.mean(-2, keepdim=True) if smooth_k else k
    pq = torch.stack([q[:, :, i:i + 16].mean(-2) for i in range(0, 70, 16)], -2)
    pk = torch.stack([kk[:, :, j:j + 8].mean(-2) for j in range(0, 53, 8)], -2)
    expect = torch.softmax(pq @ pk.transpose(-2, -1) / 4.0, -1)
    assert pmap.shape == (2, 3, 5, 7)
    torch.testing.assert_close(pmap.double(), expect, atol=1e-6, rtol=1e-5)


def test_plan_classifies_top_as_critical_bottom_as_negligible():
    q, k, _ = _qkv(lq=100, lk=160)
    cfg = SLAConfig(block_q=16, block_k=16, topk=0.2, negligible=0.3)
    plan = plan_blocks(q, k, cfg)
    scores = compressed_attention_map(q, k, cfg)
    assert (plan.num_critical, plan.num_negligible, plan.num_marginal) == (2, 3, 5)
    counts = [(plan.classes == c).sum(-1) for c in (CRITICAL, NEGLIGIBLE, MARGINAL)]
    assert all((n == want).all() for n, want in zip(counts, (2, 3, 5)))
    crit_scores = scores.gather(-1, plan.critical.long())
    neg_scores = scores.gather(-1, plan.negligible.long())
    marg_scores = scores.masked_fill(plan.classes != MARGINAL, float("nan"))
    assert (crit_scores.min(-1).values >= marg_scores.nan_to_num(-1).max(-1).values).all()
    assert (neg_scores.max(-1).values <= marg_scores.nan_to_num(2).min(-1).values).all()


@pytest.mark.parametrize("topk", [1e-6, 0.01])
def test_at_least_one_critical_block_per_row_and_no_nan(topk):
    q, k, v = _qkv(lq=40, lk=90)
    cfg = SLAConfig(block_q=16, block_k=16, topk=topk, negligible=0.0, backend="reference")
    plan = plan_blocks(q, k, cfg)
    assert plan.num_critical == 1
    o_s, o_l, _ = sla_parts(q, k, v, cfg)
    assert torch.isfinite(o_s).all() and torch.isfinite(o_l).all()


def test_all_critical_is_dense_attention_and_linear_part_vanishes():
    q, k, v = _qkv()
    cfg = SLAConfig(block_q=16, block_k=16, topk=1.0, negligible=0.0)
    o_s, o_l = sla_parts_reference(q, k, v, cfg, compute_dtype=torch.float64)
    dense = reference_attention(q, k, v, compute_dtype=torch.float64)
    assert rel_l2(o_s, dense) < TOLERANCES["reference_fp64"]
    assert o_l.abs().max() == 0


def test_sparse_part_equals_block_masked_attention_with_different_lengths():
    q, k, v = _qkv(lq=45, lk=77)
    cfg = SLAConfig(block_q=8, block_k=16, topk=0.4, negligible=0.2)
    plan = plan_blocks(q, k, cfg)
    critical, marginal = token_masks(plan, 45, 77, 8, 16)
    o_s, o_l = sla_parts_reference(q, k, v, cfg, plan=plan, compute_dtype=torch.float64)
    expect = reference_attention(q, k, v, attn_mask=critical, compute_dtype=torch.float64)
    assert rel_l2(o_s, expect) < TOLERANCES["reference_fp64"]
    # linear part: phi(q).phi(k) weighted average of v over the marginal tokens, row by row
    qphi, kphi = apply_feature_map(q, "softmax"), apply_feature_map(k, "softmax")
    b, h, i = 1, 2, 30
    sel = marginal[b, h, i]
    w = kphi[b, h, sel] @ qphi[b, h, i]
    expect_row = (w[:, None] * v[b, h, sel]).sum(0) / (w.sum() + cfg.linear_eps)
    torch.testing.assert_close(o_l[b, h, i], expect_row)


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_linear_scope_all_is_linear_attention_over_all_tokens(feature_map):
    q, k, v = _qkv()
    cfg = SLAConfig(block_q=16, block_k=16, topk=0.3, negligible=0.0, linear_scope="all", feature_map=feature_map)
    _, o_l = sla_parts_reference(q, k, v, cfg, compute_dtype=torch.float64)
    expect = linear_only_reference(q, k, v, cfg, compute_dtype=torch.float64)
    assert rel_l2(o_l, expect) < TOLERANCES["reference_fp64"]
    qphi, kphi = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    w = qphi @ kphi.transpose(-2, -1)
    assert rel_l2(o_l, (w @ v) / (w.sum(-1, keepdim=True) + cfg.linear_eps)) < TOLERANCES["reference_fp64"]


def test_reference_gradients_pass_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, lq=11, lk=13, d=4))
    cfg = SLAConfig(block_q=4, block_k=4, topk=0.25, negligible=0.25, feature_map="elu")
    plan = plan_blocks(q, k, cfg)
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, weight, bias):
        return sparse_linear_attention_reference(q, k, v, cfg, weight, bias, plan=plan, compute_dtype=torch.float64)

    assert torch.autograd.gradcheck(fn, (q, k, v, weight, bias))


def test_density_counts_tokens_of_ragged_blocks():
    q, k, _ = _qkv(lq=40, lk=40)
    cfg = SLAConfig(block_q=16, block_k=16, topk=0.34, negligible=0.0)  # one of three key blocks
    plan = plan_blocks(q, k, cfg)
    critical, _ = token_masks(plan, 40, 40, 16, 16)
    assert density(plan, 40, 40, 16, 16) == pytest.approx(critical.double().mean().item())


def test_fitting_the_projection_beats_sparse_only():
    """The paper's insight on frozen inputs: proj(O_l) compensates part of the dropped attention."""
    torch.manual_seed(1)
    b, h, n, d = 1, 4, 256, 32
    base = torch.randn(b, h, n, d)
    # locality plus shared content, so the attention is neither uniform nor block-diagonal
    q = base + 0.5 * torch.randn(b, h, n, d)
    k = base + 0.5 * torch.randn(b, h, n, d)
    v = torch.randn(b, h, n, d)
    cfg = SLAConfig(block_q=32, block_k=32, topk=0.125, negligible=0.0, backend="reference")
    dense = reference_attention(q, k, v)
    attn = SparseLinearAttention(d, cfg)
    with torch.no_grad():
        sparse_only = attn(q, k, v)
    err_sparse = rel_l2(sparse_only, dense)
    opt = torch.optim.Adam(attn.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        ((attn(q, k, v) - dense) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        err_sla = rel_l2(attn(q, k, v), dense)
    assert err_sla < (1 - TOLERANCES["proj_fit_min_gain"]) * err_sparse


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, match", [
    (dict(topk=0.0), "topk"),
    (dict(topk=1.5), "topk"),
    (dict(negligible=1.0), "negligible"),
    (dict(negligible=-0.1), "negligible"),
    (dict(topk=0.6, negligible=0.5), "exceeds 1"),
    (dict(linear_scope="all", negligible=0.1), "linear_scope='all'"),
    (dict(feature_map="hedgehog"), "feature_map"),
    (dict(block_q=0), "block_q"),
    (dict(backend="cuda"), "backend"),
])
def test_config_rejects_bad_values(fields, match):
    with pytest.raises(ConfigError, match=match):
        SLAConfig(**fields)


def test_presets_and_roundtrip():
    for name in SLAConfig.presets():
        cfg = SLAConfig.from_preset(name)
        assert SLAConfig.from_dict(cfg.to_dict()) == cfg
    assert SLAConfig.from_preset("official-main").linear_scope == "all"


def test_kernel_rejects_block_sizes_it_cannot_take():
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ConfigError, match="block_q=48"):
        sla_parts(q, k, v, SLAConfig(block_q=48, backend="triton"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attn_mask=torch.ones(70, 53, dtype=torch.bool)), NotImplementedError, "attn_mask"),
    (dict(is_causal=True), NotImplementedError, "causal"),
    (dict(dropout_p=0.1), NotImplementedError, "dropout"),
])
def test_sdpa_backend_rejects_masks_causal_dropout(kwargs, error, match):
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(error, match=match):
        sdpa(q, k, v, backend="sla", config=SLAConfig(backend="reference"), **kwargs)


def test_bad_dtypes_and_shapes_raise():
    q, k, v = _qkv(dtype=torch.float32)
    cfg = SLAConfig(backend="reference")
    with pytest.raises(ValueError, match="floating-point"):
        sla_parts(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), cfg)
    with pytest.raises(ValueError, match="share a dtype"):
        sla_parts(q, k.double(), v, cfg)
    with pytest.raises(ValueError, match="triton"):
        sla_parts(q.double(), k.double(), v.double(), SLAConfig(backend="triton"))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        sla_parts(q[0], k[0], v[0], cfg)
    with pytest.raises(TypeError, match="SLAConfig or SparseLinearAttention"):
        sdpa(q, k, v, backend="sla", config={"topk": 0.1})


def test_sdpa_backend_with_config_is_sparse_part_and_gqa_repeats_heads():
    q = torch.randn(2, 4, 40, 16)
    k, v = torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    cfg = SLAConfig(block_q=16, block_k=16, topk=0.4, negligible=0.0, backend="reference")
    out = sdpa(q, k, v, backend="sla", config=cfg, enable_gqa=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    o_s, _ = sla_parts_reference(q, kk, vv, cfg)
    assert rel_l2(out, o_s) < 1e-6
    scale = 0.3
    attn = SparseLinearAttention(16, cfg)
    torch.nn.init.normal_(attn.proj.weight)
    out = sdpa(q, kk, vv, backend="sla", config=attn, scale=scale)
    expect = sparse_linear_attention_reference(q, kk, vv, cfg, attn.proj.weight, attn.proj.bias, scale=scale)
    assert rel_l2(out, expect) < 1e-6
    assert not math.isclose(rel_l2(out, o_s), 0.0)

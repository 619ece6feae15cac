"""Triton kernels against the PyTorch twin. On CPU they run in Triton's interpreter (TRITON_INTERPRET=1),
on small awkward shapes; on a GPU the same tests run on CUDA tensors."""

import pytest
import torch

from fewer.attention.sage import SageConfig, sage_attention
from fewer.attention.sage.reference import key_mean, quantize_k, quantize_q, quantize_v, stats_tokens, value_mean
from fewer.core import can_run_triton, has_cuda, rel_l1

from .conftest import make_qkv
from .tolerances import TOLERANCES as TOL

DEVICE = "cuda" if has_cuda() else "cpu"
_ok, _why = can_run_triton(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=_why)


def _qkv(**kw):
    return tuple(t.to(DEVICE) for t in make_qkv(**kw))


@pytest.mark.parametrize("granularity", ["per_block", "per_warp", "per_thread", "per_token"])
def test_quantizers_equal_the_twin_bit_for_bit(granularity):
    from fewer.attention.sage.triton import key_slots, quantize_triton

    q, k, v = _qkv(hq=2, hk=1, lq=150, lk=200, d=48, k_bias=3.0)
    cfg = SageConfig(qk_granularity=granularity)
    k_mean, v_mean = key_mean(k), value_mean(v)
    buf = quantize_triton(q, k, v, 0.125, cfg, k_mean=k_mean, v_mean=v_mean)
    q8, qs, _ = quantize_q(q, 0.125, granularity, smooth=False)
    k8, ks = quantize_k(k, granularity, k_mean)
    v8, vs, vf = quantize_v(v, 448.0, v_mean, block_scale=True)
    d, lq, lk = 48, 150, 200
    assert torch.equal(buf["q8"][:, :lq, :d].reshape(q8.shape), q8)
    assert torch.equal(buf["q_scale"][:, :lq].reshape(qs.shape), qs)
    assert torch.equal(buf["k8"][:, :lk, :d].reshape(k8.shape), k8)
    assert torch.equal(buf["k_scale"][:, :lk].reshape(ks.shape), ks)
    assert torch.equal(buf["v_scale"][:, :d].reshape(vs.shape), vs)
    assert torch.equal(buf["v_factor"][..., 0].reshape(vf.shape), vf)
    assert torch.equal(buf["v_factor"][..., 1].reshape(vf.shape), torch.reciprocal(vf))
    slots = key_slots(buf["v_t"].shape[2], device=buf["v_t"].device)
    assert torch.equal(slots.sort().values, torch.arange(len(slots), device=slots.device))   # a permutation
    v_t = buf["v_t"][:, :d, slots[:lk]].transpose(1, 2).reshape(v8.shape)  # stored transposed [D, L], keys reordered
    assert torch.equal(v_t.view(torch.uint8), v8.view(torch.uint8))
    # padding is zero, so the attention kernel can load whole tiles without masks
    assert not buf["q8"][:, lq:].any() and not buf["k8"][:, :, d:].any()
    assert not buf["v_t"][:, d:].view(torch.uint8).any() and not buf["v_t"][:, :, slots[lk:]].view(torch.uint8).any()


def test_fp16_v_quantizer_equals_the_twin_bit_for_bit():
    from fewer.attention.sage.triton import quantize_triton

    q, k, v = _qkv(hq=2, hk=1, lq=150, lk=200, d=48)
    cfg = SageConfig.from_preset("sage2_pv16")
    v_mean = value_mean(v)
    buf = quantize_triton(q, k, v, 0.125, cfg, k_mean=key_mean(k), v_mean=v_mean)
    v16, vs, vf = quantize_v(v, 448.0, v_mean, "fp16", block_scale=True)
    assert buf["v_t"] is None and buf["v16"].dtype == torch.float16
    assert torch.equal(buf["v_factor"][..., 0].reshape(vf.shape), vf)
    assert torch.equal(buf["v_scale"][:, :48].reshape(vs.shape), vs)
    assert torch.equal(buf["v16"][:, :200, :48].reshape(v16.shape), v16)   # natural [L, D] layout
    assert not buf["v16"][:, 200:].any() and not buf["v16"][:, :, 48:].any()


def test_quantizers_without_smoothing_equal_the_twin():
    from fewer.attention.sage.triton import quantize_triton

    q, k, v = _qkv(lq=130, lk=130, d=64)
    cfg = SageConfig.from_preset("sage2_v_global", smooth_k=False, smooth_v=False)
    buf = quantize_triton(q, k, v, 0.125, cfg)
    k8, ks = quantize_k(k, "per_thread", None)
    v8, vs, _ = quantize_v(v, 448.0, None)
    assert buf["k_mean"] is None and buf["v_mean"] is None and buf["v_factor"] is None
    assert torch.equal(buf["k8"][:, :130].reshape(k8.shape), k8)
    assert torch.equal(buf["v_scale"].reshape(vs.shape), vs)


def test_kernel_means_match_torch():
    from fewer.attention.sage.triton import quantize_triton

    q, k, v = _qkv(lk=333, k_bias=3.0)
    buf = quantize_triton(q, k, v, 0.125, SageConfig())
    torch.testing.assert_close(buf["k_mean"][:, :64].reshape(1, 2, 1, 64), key_mean(k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf["v_mean"][:, :64].reshape(1, 2, 1, 64), value_mean(v), rtol=1e-5, atol=1e-5)


def test_sampled_statistics_equal_the_twin():
    # 6 chunks, a 2-chunk sample (chunks 0 and 3): means close to the twin's sample means; given those means,
    # the channel scale (sample max), the block factors and the values equal the twin bit for bit
    from fewer.attention.sage.triton import key_slots, quantize_triton

    q, k, v = _qkv(lq=64, lk=700, d=48, k_bias=3.0)
    v = v.clone()
    v[..., 140, 7] = -40.0        # outside the sample: only its block's factor sees it
    cfg = SageConfig(stats_chunks=2)
    tokens = stats_tokens(700, 2, device=k.device)
    buf = quantize_triton(q, k, v, 0.125, cfg)
    torch.testing.assert_close(buf["k_mean"][:, :48].reshape(1, 2, 1, 48), key_mean(k, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf["v_mean"][:, :48].reshape(1, 2, 1, 48), value_mean(v, tokens), rtol=1e-5,
                               atol=1e-5)
    k_mean, v_mean = key_mean(k, tokens), value_mean(v, tokens)
    buf = quantize_triton(q, k, v, 0.125, cfg, k_mean=k_mean, v_mean=v_mean)
    v8, vs, vf = quantize_v(v, 448.0, v_mean, tokens=tokens, block_scale=True)
    assert torch.equal(buf["v_scale"][:, :48].reshape(vs.shape), vs)
    assert torch.equal(buf["v_factor"][:, :6, 0].reshape(vf.shape), vf) and vf[..., 1].min() > 1.0
    slots = key_slots(buf["v_t"].shape[2], device=buf["v_t"].device)
    v_t = buf["v_t"][:, :48, slots[:700]].transpose(1, 2).reshape(v8.shape)
    assert torch.equal(v_t.view(torch.uint8), v8.view(torch.uint8))
    k8, ks = quantize_k(k, "per_thread", k_mean)
    assert torch.equal(buf["k8"][:, :700, :48].reshape(k8.shape), k8)


def test_q_smoothing_quantizer_close_to_twin():
    from fewer.attention.sage.triton import quantize_triton

    q, k, v = _qkv(lq=200, q_outlier=20.0)
    buf = quantize_triton(q, k, v, 0.125, SageConfig(smooth_q=True))
    q8, qs, mean = quantize_q(q, 0.125, "per_thread", smooth=True)
    torch.testing.assert_close(buf["q_mean"][:, :, :64].reshape(mean.shape), mean, rtol=1e-5, atol=1e-6)
    diff = (buf["q8"][:, :200, :64].reshape(q8.shape).int() - q8.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # a mean summed in another order may flip a rounding


CASES = [
    dict(shape=dict(lq=200, lk=237), causal=False),
    dict(shape=dict(lq=70, lk=700), causal=False, config=dict(stats_chunks=2)),   # sampled statistics
    dict(shape=dict(lq=200, lk=200), causal=True),
    dict(shape=dict(hq=4, hk=2, lq=70, lk=300), causal=True),
    dict(shape=dict(hq=4, hk=1, lq=300, lk=70), causal=True),
    dict(shape=dict(lq=130, lk=130, d=96), causal=False),
    dict(shape=dict(lq=64, lk=64, d=40, dtype=torch.float16), causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c["shape"].items())
                         + ("-causal" if c["causal"] else "") + ("-sampled" if "config" in c else ""))
def test_attention_kernel_matches_twin(case):
    shape = case["shape"]
    q, k, v = _qkv(**shape)
    gqa = shape.get("hq", 2) != shape.get("hk", 2)
    cfg = SageConfig(**case.get("config", {}))
    out, lse = sage_attention(q, k, v, is_causal=case["causal"], enable_gqa=gqa, return_lse=True,
                              config=cfg.replace(kernel="triton"))
    twin, twin_lse = sage_attention(q, k, v, is_causal=case["causal"], enable_gqa=gqa, return_lse=True,
                                    config=cfg.replace(kernel="torch"))
    assert torch.isfinite(out).all()
    assert rel_l1(out, twin) <= TOL["kernel_vs_twin_rel_l1_max"]
    assert (lse - twin_lse).abs().max() <= TOL["kernel_vs_twin_lse_max_abs"]


@pytest.mark.parametrize("preset", ["sage2pp", "sage2_smooth_q", "sage_per_block", "sage2_pv16", "sage2_v_global"])
def test_presets_match_twin(preset):
    q, k, v = _qkv(lq=150, lk=150, q_outlier=10.0)
    cfg = SageConfig.from_preset(preset)
    out = sage_attention(q, k, v, is_causal=True, config=cfg.replace(kernel="triton"))
    twin = sage_attention(q, k, v, is_causal=True, config=cfg.replace(kernel="torch"))
    assert rel_l1(out, twin) <= TOL["kernel_vs_twin_rel_l1_max"]


@pytest.mark.parametrize("accumulation", ["fp32+fp32", "fp32+fp16"])
def test_fp16_pv_kernel_matches_twin_gqa_ragged(accumulation):
    q, k, v = _qkv(hq=4, hk=2, lq=70, lk=300, v_bias=0.0)
    cfg = SageConfig(pv_dtype="fp16", pv_accumulation=accumulation, block_n=64)
    out, lse = sage_attention(q, k, v, enable_gqa=True, return_lse=True, config=cfg.replace(kernel="triton"))
    twin, twin_lse = sage_attention(q, k, v, enable_gqa=True, return_lse=True, config=cfg.replace(kernel="torch"))
    assert torch.isfinite(out).all()
    assert rel_l1(out, twin) <= TOL["kernel_vs_twin_rel_l1_max"]
    assert (lse - twin_lse).abs().max() <= TOL["kernel_vs_twin_lse_max_abs"]


def test_fp16_pv_pointer_path_matches_twin():
    from fewer.attention.sage.triton import attend_triton, quantize_triton

    q, k, v = _qkv(lq=130, lk=200)
    cfg = SageConfig(kernel="triton", pv_dtype="fp16")
    buffers = quantize_triton(q, k, v, 0.125, cfg)
    out = torch.empty_like(q)
    attend_triton(buffers, out, 130, 200, is_causal=True, config=cfg, use_tma=False)
    twin = sage_attention(q, k, v, scale=0.125, is_causal=True, config=cfg.replace(kernel="torch"))
    assert rel_l1(out, twin) <= TOL["kernel_vs_twin_rel_l1_max"]


def test_blhd_layout_writes_in_place_of_bhld():
    q, k, v = _qkv(hq=4, hk=2, lq=100, lk=100)
    cfg = SageConfig(kernel="triton")
    out = sage_attention(q, k, v, enable_gqa=True, config=cfg)
    out_t = sage_attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), enable_gqa=True, config=cfg,
                           layout="blhd")
    assert out_t.shape == (1, 100, 4, 64)
    assert torch.equal(out_t.transpose(1, 2), out)


def test_single_level_mode_runs():
    # the interpreter's FP8 dot accumulates in exact float32, so the two modes agree here; the loss of
    # the running accumulator exists only on the tensor cores (see the GPU benchmark's accuracy table)
    q, k, v = _qkv(lq=100, lk=300)
    one = sage_attention(q, k, v, config=SageConfig(kernel="triton", pv_accumulation="fp32"))
    two = sage_attention(q, k, v, config=SageConfig(kernel="triton"))
    if DEVICE == "cpu":
        assert rel_l1(one, two) < 1e-3
    assert torch.isfinite(one).all()


@pytest.mark.parametrize("use_tma,group4", [(False, False), (False, True), (True, False)])
def test_kernel_variants_match_twin(use_tma, group4):
    # the default (TMA loads, per-thread-group scale path) runs in every test above; the other paths here
    from fewer.attention.sage.triton import attend_triton, quantize_triton

    q, k, v = _qkv(lq=130, lk=300, k_bias=2.0)
    cfg = SageConfig(kernel="triton")
    buffers = quantize_triton(q, k, v, 0.125, cfg)
    out = torch.empty_like(q)
    attend_triton(buffers, out, 130, 300, is_causal=False, config=cfg, use_tma=use_tma, group4=group4)
    twin = sage_attention(q, k, v, scale=0.125, config=cfg.replace(kernel="torch"))
    assert rel_l1(out, twin) <= TOL["kernel_vs_twin_rel_l1_max"]


@pytest.mark.parametrize("granularity", ["per_thread", "per_warp", "per_token"])
def test_q_quantized_in_the_attention_kernel_equals_the_separate_quantizer(granularity):
    from fewer.attention.sage.triton import attend_triton, q_in_kernel, quantize_triton

    q, k, v = _qkv(hq=4, hk=2, lq=150, lk=200, d=48, q_outlier=5.0)
    cfg = SageConfig(kernel="triton", qk_granularity=granularity)
    assert q_in_kernel(cfg, 128) and q_in_kernel(cfg, 96) and not q_in_kernel(cfg.replace(smooth_q=True), 128)
    assert not q_in_kernel(cfg.replace(qk_granularity="per_block"), 128) and not q_in_kernel(cfg, 64)
    assert not q_in_kernel(cfg.replace(pv_dtype="fp16"), 128)
    fused_buf = quantize_triton(q, k, v, 0.125, cfg, quantize_q=False)
    assert fused_buf["q8"] is None
    sep_buf = quantize_triton(q, k, v, 0.125, cfg)
    outs = []
    for buf in (fused_buf, sep_buf):
        out = torch.full_like(q, float("nan"))
        lse = attend_triton(buf, out, 150, 200, is_causal=True, config=cfg)
        outs.append((out, lse))
    if DEVICE == "cpu":   # same arithmetic, same INT8 Q: the same output
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    else:
        assert rel_l1(outs[0][0], outs[1][0]) < 1e-5
    twin = sage_attention(q, k, v, scale=0.125, is_causal=True, enable_gqa=True, config=cfg.replace(kernel="torch"))
    assert rel_l1(outs[0][0], twin) <= TOL["kernel_vs_twin_rel_l1_max"]


def test_group4_refuses_per_token_scales():
    from fewer.attention.sage.triton import attend_triton, quantize_triton

    q, k, v = _qkv(lq=64, lk=64)
    cfg = SageConfig(kernel="triton", qk_granularity="per_token")
    buffers = quantize_triton(q, k, v, 0.125, cfg)
    with pytest.raises(ValueError, match="group4"):
        attend_triton(buffers, torch.empty_like(q), 64, 64, is_causal=False, config=cfg, group4=True)

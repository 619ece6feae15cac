"""The PyTorch twin (CPU path and oracle): quantizers, accuracy floors, ablations, coverage, bad input."""

import pytest
import torch

from fewer.attention import reference_attention, sdpa
from fewer.attention.sage import SageConfig, sage_attention
from fewer.attention.sage.config import ConfigError
from fewer.attention.sage.reference import (group_index, int8_by_groups, key_mean, quantize_k, quantize_q,
                                            quantize_v, round_half_away, stats_chunks, stats_tokens, value_mean)
from fewer.core import BackendUnavailable, cos_sim, rel_l1

from .conftest import make_qkv
from .tolerances import TOLERANCES as TOL

TWIN = SageConfig(kernel="torch")


def _lse_err(lse, ref_lse):
    """Largest LSE error relative to max(1, max |LSE|): INT8 score errors scale with the scores' size."""
    return float((lse - ref_lse).abs().max() / ref_lse.abs().max().clamp_min(1.0))


def _ref64(q, k, v, causal=False, gqa=False):
    return reference_attention(q, k, v, is_causal=causal, enable_gqa=gqa, compute_dtype=torch.float64,
                               return_lse=True)


# ------------------------------------------------------------------ quantizers

def test_group_index_matches_the_mma_thread_layout():
    q_groups = group_index(48, ("thread_q", 16))
    for t in range(48):  # rows r and r+8 of each 16-row warp tile share one scale, 8 scales per tile
        assert q_groups[t] == (t // 16) * 8 + (t % 16) % 8
    assert q_groups[3] == q_groups[11] and q_groups[3] != q_groups[4]
    k_groups = group_index(256, ("thread_k", 128))
    assert k_groups.unique().numel() == 8  # 4 per 128-key block
    assert k_groups[0] == k_groups[1] == k_groups[8] == k_groups[120] and k_groups[2] != k_groups[0]
    assert k_groups[128] == 4


def test_int8_rounding_is_half_away_from_zero_and_scales_are_absmax():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3]
    g = torch.Generator().manual_seed(1)
    data = torch.randn(2, 3, 40, 16, generator=g)
    gid = group_index(40, ("contiguous", 16))
    q8, scale = int8_by_groups(data, gid)
    for grp in range(3):
        rows = gid == grp
        expect = data[..., rows, :].abs().amax(dim=(-1, -2)) / 127
        assert torch.equal(scale[..., rows], expect.unsqueeze(-1).expand(-1, -1, int(rows.sum())))
    assert q8.abs().max() == 127
    err = (q8.float() * scale.unsqueeze(-1) - data).abs()
    assert (err <= scale.unsqueeze(-1) / 2 * (1 + 1e-6)).all()


def test_k_smoothing_is_exact_for_softmax_and_never_in_place():
    q, k, v = make_qkv(k_bias=5.0)
    k_before = k.clone()
    mean = key_mean(k)
    smoothed = reference_attention(q.double(), (k.double() - mean.double()), v.double(), compute_dtype=torch.float64)
    plain = reference_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    assert rel_l1(smoothed, plain) < 1e-12
    sage_attention(q, k, v, config=TWIN)
    quantize_k(k, "per_thread", mean)
    assert torch.equal(k, k_before)


def test_q_scale_folds_softmax_scale_and_log2e():
    q, _, _ = make_qkv(lq=64)
    q8, scale, _ = quantize_q(q, 0.125, "per_token", smooth=False)
    expect = q.float() * (0.125 * 1.4426950408889634)
    assert rel_l1(q8.float() * scale.unsqueeze(-1), expect) < 0.01


def test_v_per_channel_fp8_scale():
    _, _, v = make_qkv(v_gain=30.0)
    v8, scale, factor = quantize_v(v, 448.0)
    assert factor is None and v8.dtype == torch.float8_e4m3fn
    assert torch.allclose(scale, v.float().abs().amax(dim=-2) / 448.0)
    assert v8.float().abs().amax(dim=-2).max() == 448.0
    assert rel_l1(v8.float() * scale.unsqueeze(-2), v.float()) < 0.04


def test_v_block_factor_fills_each_block_and_covers_what_the_sample_missed():
    _, _, v = make_qkv(lk=700, v_gain=3.0)
    v = v.clone()
    v[..., 450, 5] = 200.0                     # an outlier in chunk 3, which a 2-chunk sample reads ...
    tokens = stats_tokens(700, 2)              # 6 chunks -> chunks 0 and 3 (stride 3)
    assert stats_chunks(700, 2) == (2, 3) and tokens.tolist() == list(range(128)) + list(range(384, 512))
    v[..., 140, 7] = -300.0                    # ... and one in chunk 1, which it misses
    mean = value_mean(v, tokens)
    v8, scale, factor = quantize_v(v, 448.0, mean, tokens=tokens, block_scale=True)
    assert factor.shape == (1, 2, 6)
    blocks = torch.nn.functional.pad(v8.float(), (0, 0, 0, 68)).reshape(1, 2, 6, 128, 64)
    assert torch.equal(blocks.abs().amax(dim=(-1, -2)), torch.full((1, 2, 6), 448.0))   # every block uses the range
    assert factor[..., 1].min() > 1.0          # the missed outlier: the block's factor grows, nothing saturates
    recon = v8.float() * scale.unsqueeze(-2) * factor.repeat_interleave(128, dim=-1)[..., :700, None] + mean
    assert rel_l1(recon, v.float()) < 0.04
    assert stats_tokens(700, 0) is None and stats_tokens(700, 6) is None and stats_tokens(700, 8) is None
    assert stats_chunks(130, 8) == (2, 1) and stats_tokens(3000, 8).numel() == 8 * 128


def test_sampled_statistics_and_block_factors_keep_the_output():
    # smoothing is exact for any centre, and the block factor is exact bookkeeping: sampled statistics and
    # per-block V factors change only roundings (here 8 chunks of 128 from 1500 keys)
    q, k, v = make_qkv(lq=100, lk=1500, k_bias=5.0)
    ref, _ = _ref64(q, k, v)
    official = sage_attention(q, k, v, config=SageConfig.from_preset("sage2_v_global", kernel="torch"))
    for cfg in (TWIN, TWIN.replace(stats_chunks=2), TWIN.replace(stats_chunks=0)):
        out = sage_attention(q, k, v, config=cfg)
        assert rel_l1(out, ref) <= 1.1 * rel_l1(official, ref) + 1e-4


# ------------------------------------------------------------------ accuracy floors (twin vs fp64)

CASES = {
    "random": dict(),
    "k_channel_bias": dict(k_bias=10.0),
    "peaked": dict(qk_gain=3.0),
    "large_v": dict(v_gain=1000.0),
    "q_outlier_channels": dict(q_outlier=20.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_accuracy_floors(case, causal):
    q, k, v = make_qkv(hq=2, lq=384, lk=384, d=64, **CASES[case])
    ref, ref_lse = _ref64(q, k, v, causal)
    out, lse = sage_attention(q, k, v, is_causal=causal, config=TWIN, return_lse=True)
    assert cos_sim(out, ref) >= TOL["cos_sim_min"]
    assert rel_l1(out, ref) <= TOL["rel_l1_max"]
    assert _lse_err(lse, ref_lse) <= TOL["lse_rel_max"]


def test_accuracy_32k_keys():
    # 32K keys against 64 queries keeps the CPU reference small; the GPU benchmark runs 32K x 32K
    q, k, v = make_qkv(hq=1, hk=1, lq=64, lk=32768, d=64)
    ref, ref_lse = _ref64(q, k, v)
    out, lse = sage_attention(q, k, v, config=TWIN, return_lse=True)
    assert cos_sim(out, ref) >= TOL["cos_sim_min"] and rel_l1(out, ref) <= TOL["rel_l1_max"]
    assert _lse_err(lse, ref_lse) <= TOL["lse_rel_max"]


def test_zero_mean_v_is_bounded_by_e4m3_resolution():
    q, k, v = make_qkv(v_bias=0.0, lq=384, lk=384)
    ref, _ = _ref64(q, k, v)
    out = sage_attention(q, k, v, config=TWIN)
    assert cos_sim(out, ref) >= TOL["zero_mean_v_cos_sim_min"]
    assert rel_l1(out, ref) <= TOL["zero_mean_v_rel_l1_max"]


def test_fp16_pv_lifts_the_zero_mean_v_floor():
    # with P~ and V in FP16 the output keeps ~10 mantissa bits: the floors hold on zero-mean V too
    q, k, v = make_qkv(v_bias=0.0, lq=384, lk=384)
    ref, _ = _ref64(q, k, v)
    out = sage_attention(q, k, v, config=SageConfig.from_preset("sage2_pv16", kernel="torch"))
    fp8 = sage_attention(q, k, v, config=TWIN)
    assert cos_sim(out, ref) >= TOL["cos_sim_min"] and rel_l1(out, ref) <= TOL["rel_l1_max"]
    assert rel_l1(out, ref) < 0.5 * rel_l1(fp8, ref)


def test_quantizers_multiply_by_the_reciprocal_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 32, generator=g) * 3
    gid = group_index(64, ("contiguous", 16))
    q8, scale = int8_by_groups(x, gid)
    expect = round_half_away(x * torch.reciprocal(scale).unsqueeze(-1)).clamp(-127, 127)
    assert torch.equal(q8.float(), expect)
    v16, vs, _ = quantize_v(x.to(torch.bfloat16).unsqueeze(0), 448.0, None, "fp16")
    assert v16.dtype == torch.float16 and v16.float().abs().amax(dim=-2).max() == 448.0


# ------------------------------------------------------------------ ablations: each trick must matter

def _err(cfg, **case):
    q, k, v = make_qkv(**case)
    return rel_l1(sage_attention(q, k, v, config=cfg), _ref64(q, k, v)[0])


def test_ablation_k_smoothing_matters():
    case = dict(k_bias=10.0, lq=256, lk=256)
    assert _err(TWIN.replace(smooth_k=False), **case) > TOL["ablation_factor"] * _err(TWIN, **case)


def test_ablation_two_level_accumulation_matters():
    # single-level runs through the twin's emulation of Hopper's truncating FP8-MMA accumulator; V
    # smoothing is off here because it keeps the accumulator small and hides the effect
    case = dict(hq=1, hk=1, lq=64, lk=4096)
    base = TWIN.replace(smooth_v=False)
    assert _err(base.replace(pv_accumulation="fp32"), **case) > 10 * _err(base, **case)


def test_ablation_v_smoothing_matters_on_peaked_attention():
    case = dict(qk_gain=3.0, lq=256, lk=256)
    assert _err(TWIN.replace(smooth_v=False), **case) > TOL["ablation_factor"] * _err(TWIN, **case)


def test_q_smoothing_helps_outlier_channels():
    case = dict(q_outlier=20.0, lq=256, lk=256, d=128)
    assert _err(TWIN, **case) > TOL["ablation_factor"] * _err(TWIN.replace(smooth_q=True), **case)


def test_finer_granularity_is_not_worse():
    case = dict(q_outlier=20.0, lq=256, lk=256)
    per_block = _err(TWIN.replace(qk_granularity="per_block"), **case)
    assert _err(TWIN.replace(qk_granularity="per_token"), **case) <= per_block


@pytest.mark.parametrize("preset", ["sage2pp", "sage2_smooth_q", "sage_per_block", "sage_per_token", "sage2_pv16",
                                    "sage2_v_global"])
def test_presets_meet_the_floors(preset):
    q, k, v = make_qkv(lq=256, lk=256)
    out = sage_attention(q, k, v, config=SageConfig.from_preset(preset, kernel="torch"))
    ref, _ = _ref64(q, k, v)
    assert cos_sim(out, ref) >= TOL["cos_sim_min"] and rel_l1(out, ref) <= TOL["rel_l1_max"]


# ------------------------------------------------------------------ coverage

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 64, 96, 128, 256])
def test_dtypes_and_head_dims(dtype, d):
    q, k, v = make_qkv(lq=130, lk=130, d=d, dtype=dtype)
    out = sage_attention(q, k, v, is_causal=True, config=TWIN)
    assert out.dtype == dtype and out.shape == q.shape
    ref, _ = _ref64(q, k, v, causal=True)
    assert rel_l1(out, ref) <= TOL["rel_l1_max"]


@pytest.mark.parametrize("hq, hk", [(4, 2), (4, 1)])
@pytest.mark.parametrize("lq, lk", [(70, 301), (301, 70), (129, 129)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa_and_ragged_lengths(hq, hk, lq, lk, causal):
    q, k, v = make_qkv(hq=hq, hk=hk, lq=lq, lk=lk)
    out, lse = sage_attention(q, k, v, is_causal=causal, enable_gqa=True, config=TWIN, return_lse=True)
    ref, ref_lse = _ref64(q, k, v, causal, gqa=True)
    assert rel_l1(out, ref) <= TOL["rel_l1_max"]
    assert _lse_err(lse, ref_lse) <= TOL["lse_rel_max"]


def test_blhd_layout_matches_bhld():
    q, k, v = make_qkv(hq=4, hk=2)
    out = sage_attention(q, k, v, is_causal=True, enable_gqa=True, config=TWIN)
    out_t = sage_attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), is_causal=True, enable_gqa=True,
                           config=TWIN, layout="blhd")
    assert torch.equal(out_t.transpose(1, 2), out)


def test_sdpa_backend_and_preset_names():
    q, k, v = make_qkv()
    direct = sage_attention(q, k, v, config=SageConfig.from_preset("sage2pp", kernel="torch"))
    via_sdpa = sdpa(q, k, v, backend="sage", config=SageConfig.from_preset("sage2pp", kernel="torch"))
    assert torch.equal(direct, via_sdpa)
    assert torch.equal(sdpa(q, k, v, backend="sage"), sage_attention(q, k, v, config="sage2"))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(attn_mask=torch.ones(200, 200, dtype=torch.bool)), NotImplementedError, "takes no attn_mask"),
    (dict(dropout_p=0.1), NotImplementedError, "no dropout"),
    (dict(layout="lbhd"), ValueError, "layout"),
    (dict(config=object()), ValueError, "SageConfig or a preset"),
])
def test_unsupported_arguments_raise(kwargs, exc, match):
    q, k, v = make_qkv()
    with pytest.raises(exc, match=match):
        sage_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q.float(), k.float(), v.float()), "float16 and bfloat16"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), "CUDA .* or CPU"),
    (lambda q, k, v: (q[0], k[0], v[0]), "4-D"),
    (lambda q, k, v: (torch.cat([q] * 5, -1)[..., :300],) * 3, "head dims up to 256"),
    (lambda q, k, v: (q, k, v[..., :32]), "one head dim"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "enable_gqa=True"),
])
def test_bad_inputs_raise(make, match):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=match):
        sage_attention(*make(q, k, v))


def test_config_validation():
    with pytest.raises(ConfigError, match="qk_granularity"):
        SageConfig(qk_granularity="per_channel")
    with pytest.raises(ConfigError, match="exceeds the FP16 maximum"):
        SageConfig(pv_accumulation="fp32+fp16", block_n=128, v_scale_max=2.25)
    assert SageConfig(pv_accumulation="fp32+fp16", block_n=64).resolved_v_scale_max == 2.25
    with pytest.raises(ConfigError, match="pv_dtype"):
        SageConfig(pv_dtype="bf16")
    assert SageConfig.from_preset("sage2_pv16").pv_dtype == "fp16"
    assert SageConfig(pv_accumulation="fp32+fp16", block_n=128).resolved_v_scale_max == 1.0
    assert SageConfig.from_dict(SageConfig.from_preset("sage2pp").to_dict()) == SageConfig.from_preset("sage2pp")
    with pytest.raises(ConfigError, match="stats_chunks"):
        SageConfig(stats_chunks=-1)
    with pytest.raises(ConfigError, match="v_block_scale=False"):
        SageConfig(v_block_scale=False)
    glob = SageConfig.from_preset("sage2_v_global")
    assert not glob.v_block_scale and glob.stats_chunks == 0


def test_explicit_triton_kernel_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv()
    with pytest.raises(BackendUnavailable, match="kernel='triton' cannot run here"):
        sage_attention(q, k, v, config=SageConfig(kernel="triton"))


def test_backward_raises_instead_of_cutting_the_gradient():
    q, k, v = make_qkv()
    q.requires_grad_(True)
    out = sage_attention(q, k, v, config=TWIN)
    with pytest.raises(NotImplementedError, match="forward-only"):
        out.sum().backward()


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v = make_qkv(hq=4, hk=2)

    def fn(q, k, v):
        return sage_attention(q, k, v, is_causal=True, enable_gqa=True, config=TWIN) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), fn(q, k, v))

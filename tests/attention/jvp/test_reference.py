"""The PyTorch reference: closed form, kernel twin and backward against torch's own autodiff."""

import pytest
import torch

from fewer.attention.jvp import reference as ref
from fewer.core import rel_l2

from .conftest import make_inputs
from .tolerances import TOLERANCES

F64 = torch.float64
SHAPES = [(13, 29), (29, 13), (20, 20)]   # cross-attention both ways, and square


def _ref_fn(causal, scale):
    return lambda q, k, v: ref.attention_reference(q, k, v, causal, scale, compute_dtype=F64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", SHAPES)
def test_closed_form_equals_torch_func_jvp_in_float64(causal, lq, lk):
    q, k, v, tq, tk, tv = make_inputs(2, 3, lq, lk, 16, F64, dv=24)
    o, to = torch.func.jvp(_ref_fn(causal, 0.3), (q, k, v), (tq, tk, tv))
    o2, to2 = ref.jvp_attention_exact(q, k, v, tq, tk, tv, causal, 0.3, compute_dtype=F64, chunk_size=7)
    assert rel_l2(o2, o) < TOLERANCES["exact_vs_autodiff_fp64"]
    assert rel_l2(to2, to) < TOLERANCES["exact_vs_autodiff_fp64"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_n", [8, 13, 64])      # 13 does not divide the key length
def test_twin_float32_matches_float64(causal, block_n):
    ins = make_inputs(1, 2, 37, 53, 32, torch.float32)
    o, to, lse = ref.jvp_attention_blockwise(*ins, causal, None, block_n=block_n)
    o64, to64 = ref.jvp_attention_exact(*(t.double() for t in ins), causal, None, compute_dtype=F64)
    q, k = ins[0].double(), ins[1].double()
    scores = q @ k.transpose(-2, -1) / 32 ** 0.5
    if causal:
        scores = scores.masked_fill(~ref._causal_keep(0, 37, 53, q.device), float("-inf"))
    assert rel_l2(o, o64) < TOLERANCES["fp32_vs_fp64"]
    assert rel_l2(to, to64) < TOLERANCES["fp32_vs_fp64"]
    assert rel_l2(lse, torch.logsumexp(scores, -1)) < TOLERANCES["fp32_vs_fp64"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_centring_beats_the_uncentred_formulation_on_peaked_attention(dtype):
    """Ablation: accumulating (P tS) V and subtracting mu O at the end (rCM's kernel) loses accuracy
    on peaked attention; centring on the running mu does not."""
    ins = make_inputs(1, 4, 64, 96, 64, dtype, peaked=True)
    _, to64 = ref.jvp_attention_exact(*(t.double() for t in ins), False, None, compute_dtype=F64)
    _, centred, _ = ref.jvp_attention_blockwise(*ins, block_n=16)
    _, plain, _ = ref.jvp_attention_blockwise(*ins, block_n=16, centre=False)
    assert rel_l2(centred, to64) < 0.75 * rel_l2(plain, to64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", SHAPES)
def test_backward_through_tangent_equals_double_autograd(causal, lq, lk):
    ins = make_inputs(2, 2, lq, lk, 16, F64, dv=8)
    leaves = [t.clone().requires_grad_() for t in ins]
    o, to = torch.func.jvp(_ref_fn(causal, None), tuple(leaves[:3]), tuple(leaves[3:]))
    go, gto = torch.randn_like(o), torch.randn_like(to)
    expected = torch.autograd.grad((o, to), leaves, (go, gto))
    got = ref.jvp_attention_backward(*ins, go, gto, causal, None, chunk_size=6)
    for name, g, e in zip(("q", "k", "v", "tq", "tk", "tv"), got, expected):
        assert rel_l2(g, e) < TOLERANCES["backward_fp64"], name


@pytest.mark.parametrize("causal", [False, True])
def test_primal_backward_equals_autograd(causal):
    q, k, v = make_inputs(2, 2, 29, 13, 16, F64)[:3]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _ref_fn(causal, None)(*leaves)
    go = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, go)
    got = ref.attention_backward(q, k, v, go, causal, None, chunk_size=5)
    for g, e in zip(got, expected):
        assert rel_l2(g, e) < TOLERANCES["backward_fp64"]


def test_reference_attention_has_forward_ad_and_double_backward():
    q, k, v, tq, tk, tv = (t.requires_grad_() for t in make_inputs(1, 1, 3, 4, 2, F64))

    def tangent(q, k, v, tq, tk, tv):
        return torch.func.jvp(_ref_fn(True, None), (q, k, v), (tq, tk, tv))[1]

    assert torch.autograd.gradcheck(tangent, (q, k, v, tq, tk, tv))
    assert torch.autograd.gradgradcheck(_ref_fn(True, None), (q, k, v))

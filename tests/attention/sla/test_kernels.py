"""The fused Triton kernels against the reference (interpreter on CPU, or a GPU): forward and backward,
every linear mode, ragged and unequal lengths, padded head dims."""

import pytest
import torch

from fewer.attention.sla import SLAConfig, SparseLinearAttention, plan_blocks, sla_parts
from fewer.attention.sla import triton as sla_triton
from fewer.attention.sla.ops import MODE_DIRECT, MODE_NONE, MODE_SUBTRACT, linear_mode_for, sla_totals_op
from fewer.attention.sla.reference import sla_parts_reference
from fewer.core import rel_l2

from .tolerances import TOLERANCES

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Lq, Lk, D, config fields, expected linear mode): small shapes, the interpreter is slow
CASES = {
    "subtract": (1, 2, 113, 77, 32, dict(topk=0.2, negligible=0.2), MODE_SUBTRACT),
    "direct-d72": (1, 1, 50, 90, 72, dict(topk=0.2, negligible=0.6, feature_map="elu"), MODE_DIRECT),
    "scope-all": (2, 1, 64, 40, 16, dict(topk=0.3, negligible=0.0, linear_scope="all", smooth_k=True), MODE_NONE),
    "no-marginal": (1, 1, 40, 60, 16, dict(topk=0.5, negligible=0.5, feature_map="relu"), MODE_NONE),
}


def _inputs(case, dtype):
    b, h, lq, lk, d, fields, mode = CASES[case]
    cfg = SLAConfig(block_q=16, block_k=16, backend="triton", **fields)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE).to(dtype) for n in (lq, lk, lk))
    return cfg, q, k, v, mode


def _module_with_random_proj(d: int, cfg: SLAConfig) -> SparseLinearAttention:
    attn = SparseLinearAttention(d, cfg).to(DEVICE)
    torch.nn.init.normal_(attn.proj.weight, std=0.3)
    torch.nn.init.normal_(attn.proj.bias, std=0.1)
    return attn


def _assert_inference_within_budget(attn, cfg, q, k, v, dtype, after_forward=None):
    """The module's inference call in ``dtype``: error vs fp64 at most the budget times that of the
    reference module run in the same dtype (same plan). ``after_forward`` checks the module's state."""
    from fewer.attention.sla.reference import sparse_linear_attention_reference as full_ref
    with torch.no_grad():
        got = attn(q, k, v)
        if after_forward is not None:
            after_forward()
        plan, w, b = attn.last_plan, attn.proj.weight, attn.proj.bias
        exact = full_ref(q.double(), k.double(), v.double(), cfg, w.double(), b.double(), plan=plan,
                         compute_dtype=torch.float64)
        half = full_ref(q, k, v, cfg, w, b, plan=plan, compute_dtype=dtype)
    assert torch.isfinite(got).all()
    budget = TOLERANCES["kernel_lowp_fwd_ratio"]
    assert rel_l2(got, exact) <= budget * rel_l2(half, exact), f"{rel_l2(got, exact):.2e} vs {rel_l2(half, exact):.2e}"


def _grads(fn, q, k, v, g_s, g_l, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o_s, o_l = fn(*leaves)
    loss = (o_s.double() * g_s).sum() + (o_l.double() * g_l).sum()
    return [o_s.double(), o_l.double()] + [t.double() for t in torch.autograd.grad(loss, leaves)]


def _set_forward(monkeypatch, split: bool, pair: int) -> None:
    monkeypatch.setitem(sla_triton.SPLIT_FORWARD, 16, split)
    monkeypatch.setitem(sla_triton.PAIR_BLOCKS, "fwd", pair)
    monkeypatch.setitem(sla_triton.PAIR_BLOCKS, "lin", pair)


@pytest.fixture(params=[(False, 1), (True, 1)], ids=["fused", "split"])
def split_forward(request, monkeypatch):
    """Run the kernels' forward as one fused kernel or as sparse kernel + linear-part kernel."""
    _set_forward(monkeypatch, *request.param)
    return request.param


@pytest.fixture(params=[(False, 1), (True, 1), (False, 2), (True, 2)],
                ids=["fused", "split", "fused-pair", "split-pair"])
def any_forward(request, monkeypatch):
    """As split_forward, also with two key blocks per loop step (PAIR_BLOCKS = 2)."""
    _set_forward(monkeypatch, *request.param)
    return request.param


def _fp32_kernel_and_fp64_reference(cfg, plan, q, k, v):
    """(O_s, O_l, dQ, dK, dV) of the fp32 kernels and of the fp64 reference, for the same random output grads."""
    g_s = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)
    g_l = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)
    got = _grads(lambda a, b, c: sla_parts(a, b, c, cfg, plan=plan)[:2], q, k, v, g_s, g_l, torch.float32)
    ref = _grads(lambda a, b, c: sla_parts_reference(a, b, c, cfg, plan=plan, compute_dtype=torch.float64),
                 q, k, v, g_s, g_l, torch.float64)
    return got, ref


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_kernels_match_fp64_reference(case, any_forward):
    cfg, q, k, v, mode = _inputs(case, torch.float32)
    plan = plan_blocks(q, k, cfg)
    assert linear_mode_for(plan, cfg) == mode
    got, ref = _fp32_kernel_and_fp64_reference(cfg, plan, q, k, v)
    for name, a, b in zip(("o_s", "o_l", "dq", "dk", "dv"), got, ref):
        tol = TOLERANCES["kernel_fp32_fwd" if name.startswith("o") else "kernel_fp32_bwd"]
        if name == "o_l" and mode == MODE_NONE and cfg.linear_scope == "complement":
            assert a.abs().max() == 0 and b.abs().max() == 0, "no marginal block: the linear part must vanish"
            continue
        assert rel_l2(a, b) < tol, f"{case} {name}: {rel_l2(a, b):.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["subtract", "direct-d72"])
def test_half_precision_error_within_budget_of_torch_at_same_precision(case, dtype, split_forward):
    """Error vs fp64 at most 2x (forward) / 3x (backward) that of the reference run in that dtype."""
    cfg, q, k, v, _ = _inputs(case, dtype)
    plan = plan_blocks(q, k, cfg)
    g_s = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)
    g_l = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)

    def ref(dtype):
        return _grads(lambda a, b, c: sla_parts_reference(a, b, c, cfg, plan=plan, compute_dtype=dtype),
                      q, k, v, g_s, g_l, dtype)

    got = _grads(lambda a, b, c: sla_parts(a, b, c, cfg, plan=plan)[:2], q, k, v, g_s, g_l, dtype)
    exact, torch_half = ref(torch.float64), ref(dtype)
    for name, a, e, t in zip(("o_s", "o_l", "dq", "dk", "dv"), got, exact, torch_half):
        budget = TOLERANCES["kernel_lowp_fwd_ratio" if name.startswith("o") else "kernel_lowp_bwd_ratio"]
        assert torch.isfinite(a).all()
        assert rel_l2(a, e) <= budget * rel_l2(t, e), f"{case} {name}: {rel_l2(a, e):.2e} vs {rel_l2(t, e):.2e}"


@pytest.mark.parametrize("case", ["subtract", "direct-d72"])
def test_module_gradients_reach_projection_and_match_reference(case, split_forward):
    """The module's forward applies proj in the kernel epilogue: output and every gradient (q, k, v,
    proj weight and bias) match the reference module; the inference call (no parts saved) too."""
    cfg, q, k, v, _ = _inputs(case, torch.float32)
    attn = SparseLinearAttention(q.shape[-1], cfg).to(DEVICE)
    torch.nn.init.normal_(attn.proj.weight, std=0.3)
    torch.nn.init.normal_(attn.proj.bias, std=0.1)
    ref_attn = SparseLinearAttention(q.shape[-1], cfg.replace(backend="reference")).to(DEVICE)
    ref_attn.load_state_dict(attn.state_dict())
    grad = torch.randn_like(q)
    outs = []
    for module in (attn, ref_attn):
        module.zero_grad()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves)
        out.backward(grad)
        outs.append([out] + [t.grad for t in leaves] + [module.proj.weight.grad.clone(), module.proj.bias.grad.clone()])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dW", "db"), outs[0], outs[1]):
        assert b.abs().sum() > 0
        assert rel_l2(a, b) < 1e-5, f"{case} {name}: {rel_l2(a, b):.3e}"
    with torch.no_grad():
        assert rel_l2(attn(q, k, v), outs[1][0]) < 1e-5


def test_totals_pass_matches_fp64_and_its_gradient():
    """H_tot = phi(K)^T V and Z_tot over chunks of key tiles (ragged length), and its autograd."""
    kphi = torch.rand(3, 150, 32, device=DEVICE, dtype=torch.float64)
    v = torch.randn(3, 150, 32, device=DEVICE, dtype=torch.float64)
    htot, ztot = sla_totals_op(kphi.float(), v.float())
    assert rel_l2(htot.double(), kphi.transpose(-2, -1) @ v) < 1e-6
    assert rel_l2(ztot.double(), kphi.sum(-2)) < 1e-6
    torch.library.opcheck(torch.ops.fewer.sla_totals.default,
                          (kphi.float().requires_grad_(), v.float().requires_grad_()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_custom_op_registration_passes_opcheck():
    """The torch.library op's fake function and autograd registration agree with the real kernel."""
    cfg, q, k, v, _ = _inputs("subtract", torch.float32)
    plan = plan_blocks(q, k, cfg)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    qc, kc, vc = (t.reshape(b * h, -1, d).contiguous().requires_grad_() for t in (q, k, v))
    qphi = torch.softmax(qc.detach(), -1).requires_grad_()
    kphi = torch.softmax(kc.detach(), -1).requires_grad_()
    htot = (kphi.detach().transpose(-2, -1) @ vc.detach()).requires_grad_()
    ztot = kphi.detach().sum(-2).requires_grad_()
    mq = plan.critical.shape[2]
    wpt = torch.randn(d, d, device=DEVICE, requires_grad=True)
    bp = torch.randn(d, device=DEVICE, requires_grad=True)
    for fuse_proj in (False, True):
        args = (qc, kc, vc, qphi, kphi, htot, ztot, plan.critical.reshape(b * h, mq, -1).contiguous(),
                plan.negligible.reshape(b * h, mq, -1).contiguous(), wpt, bp, MODE_SUBTRACT, 0.25, 1e-5, 16, 16,
                fuse_proj, True, False)
        torch.library.opcheck(torch.ops.fewer.sla_forward.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("fields", [dict(topk=0.2, negligible=0.3), dict(topk=0.1, negligible=0.0, smooth_k=True),
                                    dict(topk=0.05, negligible=0.9)])
def test_plan_pass_equals_reference_plan(fields):
    """The Triton plan (one sort per row) picks the same blocks in the same order as torch.topk."""
    from fewer.attention.sla.ops import plan_blocks_kernel
    cfg = SLAConfig(block_q=16, block_k=8, backend="triton", **fields)
    q, k = torch.randn(2, 3, 150, 16, device=DEVICE), torch.randn(2, 3, 333, 16, device=DEVICE)
    got, ref = plan_blocks_kernel(q, k, cfg), plan_blocks(q, k, cfg)
    for name, a, b in zip(("critical", "negligible", "classes"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["subtract", "direct-d72"])
def test_half_precision_inference_forward_within_budget(case, dtype, split_forward):
    """The inference call (phi(Q) in the kernel, proj in the epilogue, no parts saved; bf16: H_tot as
    bf16 hi + lo) in half precision: error vs fp64 at most 2x that of the reference module run in
    the same dtype."""
    cfg, q, k, v, _ = _inputs(case, dtype)
    _assert_inference_within_budget(_module_with_random_proj(q.shape[-1], cfg), cfg, q, k, v, dtype)


@pytest.mark.parametrize("fold,pre,phi_in_kernel", [(True, False, True), (False, True, True), (True, True, False)])
def test_folded_projection_inference_within_budget(fold, pre, phi_in_kernel, monkeypatch):
    """The inference call's options, bf16: the projection folded into V and H_tot (V' = V Wp^T from
    the totals pass, no epilogue matmul), the sums started from the totals (PRELOAD_TOTALS), phi(Q)
    read or computed in the kernel: within 2x of the bf16 reference module's error vs fp64."""
    case = "subtract"
    _set_forward(monkeypatch, True, 1)
    monkeypatch.setattr(sla_triton, "FOLD_PROJ", fold)
    monkeypatch.setattr(sla_triton, "PRELOAD_TOTALS", pre)
    monkeypatch.setattr(sla_triton, "PHI_IN_KERNEL", phi_in_kernel)
    cfg, q, k, v, _ = _inputs(case, torch.bfloat16)
    _assert_inference_within_budget(_module_with_random_proj(q.shape[-1], cfg), cfg, q, k, v, torch.bfloat16)


def test_totals_pass_with_projected_values():
    """PROJ_V: V' = V Wp^T stored in bf16 and H'_tot = phi(K)^T V' over the stored V'."""
    kphi = torch.rand(2, 150, 32, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(2, 150, 32, device=DEVICE).to(torch.bfloat16)
    wpt = torch.randn(32, 32, device=DEVICE) * 0.2
    htot, ztot, vp = sla_triton.sla_totals(kphi, v, wpt)
    exact_vp = v.double() @ wpt.double()
    assert vp.dtype == torch.bfloat16 and rel_l2(vp.double(), exact_vp) < 5e-3
    assert rel_l2(htot.double(), kphi.double().transpose(-2, -1) @ vp.double()) < 1e-5
    assert rel_l2(ztot.double(), kphi.double().sum(-2)) < 1e-5


@pytest.mark.parametrize("case", ["subtract", "direct-d72"])
def test_preloaded_totals_fp32_match_fp64_reference(case, monkeypatch):
    """PRELOAD_TOTALS (sums start at phi(Q) H_tot, blocks subtracted in place), split forward, fp32:
    outputs and gradients as exact as the default path."""
    _set_forward(monkeypatch, True, 1)
    monkeypatch.setattr(sla_triton, "PRELOAD_TOTALS", True)
    cfg, q, k, v, mode = _inputs(case, torch.float32)
    plan = plan_blocks(q, k, cfg)
    got, ref = _fp32_kernel_and_fp64_reference(cfg, plan, q, k, v)
    for name, a, b in zip(("o_s", "o_l", "dq", "dk", "dv"), got, ref):
        assert rel_l2(a, b) < TOLERANCES["kernel_fp32_fwd"], f"{case} {name}: {rel_l2(a, b):.3e}"


@pytest.mark.parametrize("phi", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("block", [16, 64])
def test_phi_pool_pass_equals_torch(phi, block):
    """The inference forward's pass over Q or K: phi(x) in x's dtype (as the torch feature map rounds
    it) and the fp32 block means of pool_blocks, the last block ragged."""
    from fewer.attention.sla.ops import PHI_CODES, _feature_map_lowp
    from fewer.attention.sla.reference import pool_blocks
    x = (torch.randn(2, 150, 40, device=DEVICE) * 2).to(torch.bfloat16)
    out, pooled = sla_triton.sla_phi_pool(x, block, PHI_CODES[phi])
    expected = _feature_map_lowp(x, phi).float()
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert ((out.float() - expected).abs() <= 2 ** -7 * expected.abs() + 1e-30).all()  # one bf16 ulp
    assert pooled.shape == (2, -(-150 // block), 40)
    assert rel_l2(pooled.double(), pool_blocks(x, block).double()) < 1e-6
    assert sla_triton.sla_phi_pool(x, block, PHI_CODES[phi], write_phi=False)[0] is None


@pytest.mark.parametrize("fold,phi_in_kernel", [(False, True), (True, False)])
def test_inference_forward_with_phi_pool_pass(fold, phi_in_kernel, monkeypatch):
    """The inference call takes the plan's pooled blocks and phi from the phi/pool pass (checked: it
    runs), picks the reference plan, and stays within the half-precision budget (bf16, 64-token blocks,
    smooth-K, ragged lengths)."""
    monkeypatch.setattr(sla_triton, "FOLD_PROJ", fold)
    monkeypatch.setattr(sla_triton, "PHI_IN_KERNEL", phi_in_kernel)
    calls = []
    phi_pool = sla_triton.sla_phi_pool
    monkeypatch.setattr(sla_triton, "sla_phi_pool", lambda *a: calls.append(a[2:]) or phi_pool(*a))
    cfg = SLAConfig(block_q=64, block_k=64, topk=0.2, negligible=0.2, smooth_k=True, backend="triton")
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE).to(torch.bfloat16) for n in (130, 300, 300))
    attn = _module_with_random_proj(32, cfg)

    def uses_pass_and_reference_plan():
        assert calls == [(1, not phi_in_kernel), (1, True)]
        assert all(torch.equal(a, b) for a, b in zip(attn.last_plan, plan_blocks(q, k, cfg)))
    _assert_inference_within_budget(attn, cfg, q, k, v, torch.bfloat16, uses_pass_and_reference_plan)

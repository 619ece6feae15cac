"""Autodiff through fewer's attention: torch.func.jvp, forward_ad, backward, backward through the tangent,
and the ``jvp`` backend of fewer.attention.sdpa inside a model."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fewer.attention import sdpa, use_backend
from fewer.attention.jvp import JvpAttentionConfig, attention, jvp_attention
from fewer.attention.jvp import reference as ref
from fewer.core import rel_l2
from fewer.core.capability import triton_interpreter_on

from .conftest import make_inputs
from .tolerances import TOLERANCES

F64 = torch.float64
# The Triton path runs on CPU only under the interpreter; the reference path always.
BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_on(),
                                                            reason="needs TRITON_INTERPRET=1 on CPU")),
            "reference"]


def _oracle(ins, causal):
    return ref.jvp_attention_exact(*(t.double() for t in ins), causal, None, compute_dtype=F64)


def _ref64(causal):
    return lambda q, k, v: ref.attention_reference(q, k, v, causal, None, compute_dtype=F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_func_jvp_through_attention(backend, causal):
    ins = make_inputs(2, 2, 19, 23, 32)
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, is_causal=causal, backend=backend),
                           tuple(ins[:3]), tuple(ins[3:]))
    o64, to64 = _oracle(ins, causal)
    assert rel_l2(o, o64) < TOLERANCES["fp32_vs_fp64"]
    assert rel_l2(to, to64) < TOLERANCES["fp32_vs_fp64"]
    o2, to2 = jvp_attention(*ins, is_causal=causal, backend=backend)
    assert rel_l2(o2, o64) < TOLERANCES["fp32_vs_fp64"] and rel_l2(to2, to64) < TOLERANCES["fp32_vs_fp64"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_with_a_tangent_on_k_only(backend):
    q, k, v, _, tk, _ = make_inputs(1, 2, 17, 17, 16)
    with fwAD.dual_level():
        out = attention(q, fwAD.make_dual(k, tk), v, backend=backend)
        _, tangent = fwAD.unpack_dual(out)
    zeros = torch.zeros_like(q)
    _, to64 = _oracle([q, k, v, zeros, tk, torch.zeros_like(v)], False)
    assert rel_l2(tangent, to64) < TOLERANCES["fp32_vs_fp64"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_through_output_and_tangent_match_double_autograd(backend, causal):
    ins = make_inputs(1, 2, 21, 27, 16, dv=8)
    leaves = [t.clone().requires_grad_() for t in ins]
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, is_causal=causal, backend=backend),
                           tuple(leaves[:3]), tuple(leaves[3:]))
    go, gto = torch.randn_like(o), torch.randn_like(to)
    got = torch.autograd.grad((o, to), leaves, (go, gto))
    leaves64 = [t.double().requires_grad_() for t in ins]
    o64, to64 = torch.func.jvp(_ref64(causal), tuple(leaves64[:3]), tuple(leaves64[3:]))
    expected = torch.autograd.grad((o64, to64), leaves64, (go.double(), gto.double()))
    for name, g, e in zip(("q", "k", "v", "tq", "tk", "tv"), got, expected):
        assert rel_l2(g, e) < TOLERANCES["grad_through_tangent_fp32"], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_of_a_loss_on_the_tangent(backend):
    """The MeanFlow/sCM pattern: a loss on the JVP, differentiated w.r.t. the primal inputs."""
    ins = make_inputs(1, 1, 11, 13, 16)

    def loss(q, k, v, tq, tk, tv, attn):
        return torch.func.jvp(attn, (q, k, v), (tq, tk, tv))[1].square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(*ins, lambda q, k, v: attention(q, k, v, backend=backend))
    ins64 = [t.double() for t in ins]
    expected = torch.func.grad(loss, argnums=(0, 1, 2))(*ins64, _ref64(False))
    for g, e in zip(got, expected):
        assert rel_l2(g, e) < TOLERANCES["grad_through_tangent_fp32"]


@pytest.mark.parametrize("shape", [(2, 9, 16), (2, 2, 2, 9, 16)])
def test_any_leading_dims(shape):
    ins = [torch.randn(shape) for _ in range(6)]
    o, to = jvp_attention(*ins, backend="triton" if triton_interpreter_on() else "reference")
    o64, to64 = _oracle(ins, False)
    assert o.shape == shape and rel_l2(to, to64) < TOLERANCES["fp32_vs_fp64"]


class _TinyAttentionBlock(torch.nn.Module):
    """A model that calls fewer.attention.sdpa, as every fewer model does."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * dim * kv_heads // heads)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        y = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_model_through_the_jvp_backend_supports_torch_func_jvp(kernel):
    if kernel == "triton" and not triton_interpreter_on():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    torch.manual_seed(1)
    model = _TinyAttentionBlock()
    x, tx = torch.randn(2, 13, 32), torch.randn(2, 13, 32)
    with use_backend("jvp", JvpAttentionConfig(kernel=kernel)):
        y, ty = torch.func.jvp(model, (x,), (tx,))
    model64 = _TinyAttentionBlock().double()
    model64.load_state_dict(model.state_dict())
    with use_backend("reference"):   # plain float64 softmax attention, differentiated by torch itself
        y64, ty64 = torch.func.jvp(model64, (x.double(),), (tx.double(),))
    assert rel_l2(y, y64) < 1e-5 and rel_l2(ty, ty64) < 1e-5
    # backward through the tangent reaches the weights, as through float64 reference attention (fewer's
    # own: the shared 'reference' backend uses logsumexp, whose forward-AD rule breaks this backward)
    grads = {}
    oracle_cfg = JvpAttentionConfig(kernel="reference")
    for name, mod, inp, tan, cfg in (("kernel", model, x, tx, JvpAttentionConfig(kernel=kernel)),
                                     ("oracle", model64, x.double(), tx.double(), oracle_cfg)):
        with use_backend("jvp", cfg):
            with fwAD.dual_level():
                _, t = fwAD.unpack_dual(mod(fwAD.make_dual(inp, tan)))
        t.square().sum().backward()
        grads[name] = {n: p.grad for n, p in mod.named_parameters()}
    # None where the tangent does not depend on a parameter (the output bias); compared as one vector
    # because some gradients are exactly zero in theory (the key and value biases)
    assert [n for n, g in grads["oracle"].items() if g is None] == [n for n, g in grads["kernel"].items() if g is None]
    flat = {name: torch.cat([g.flatten().double() for g in gs.values() if g is not None])
            for name, gs in grads.items()}
    assert rel_l2(flat["kernel"], flat["oracle"]) < 1e-5

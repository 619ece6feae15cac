"""Bad input gets a clear error naming the requirement; an explicit backend never falls back."""

import pytest
import torch

from fewer.attention import sdpa
from fewer.attention.jvp import JvpAttentionConfig, attention, jvp_attention
from fewer.core import BackendUnavailable, ConfigError
from fewer.core.capability import triton_interpreter_on

from .conftest import make_inputs


def _ins(**kw):
    return make_inputs(1, 2, 8, 8, 16, **kw)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_tangent_shape_mismatch(backend):
    q, k, v, tq, tk, tv = _ins()
    with pytest.raises(ValueError, match="tangent tk has shape .* must have its primal's shape"):
        jvp_attention(q, k, v, tq, tk[..., :4, :], tv, backend=backend)


def test_tangent_dtype_mismatch():
    q, k, v, tq, tk, tv = _ins()
    with pytest.raises(ValueError, match="tangent tv has dtype torch.float16 .* primal's dtype"):
        jvp_attention(q, k, v, tq, tk, tv.half())


def test_primal_mismatches():
    q, k, v, *_ = _ins()
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="head dims differ"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="lengths differ"):
        attention(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match="no keys"):
        attention(q, k[..., :0, :], v[..., :0, :])
    with pytest.raises(ValueError, match="equal leading"):
        attention(q, k[:, :1], v[:, :1])


def test_sdpa_backend_refuses_masks_and_dropout():
    q, k, v, *_ = _ins()
    with pytest.raises(NotImplementedError, match="no attn_mask"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool), backend="jvp")
    with pytest.raises(NotImplementedError, match="additive"):
        sdpa(q, k, v, attn_mask=torch.zeros(8, 8), backend="jvp")
    with pytest.raises(NotImplementedError, match="no dropout"):
        sdpa(q, k, v, dropout_p=0.1, backend="jvp")
    with pytest.raises(ValueError, match="JvpAttentionConfig"):
        sdpa(q, k, v, backend="jvp", config={"kernel": "triton"})


def test_config_validation():
    with pytest.raises(ConfigError, match="kernel"):
        JvpAttentionConfig(kernel="cuda")
    with pytest.raises(ConfigError, match="backward_chunk"):
        JvpAttentionConfig(backward_chunk=0)


@pytest.mark.skipif(not triton_interpreter_on(), reason="the kernel's own checks need the Triton path")
def test_kernel_refuses_what_it_cannot_take():
    q, k, v, tq, tk, tv = make_inputs(1, 1, 4, 4, 256)
    with pytest.raises(NotImplementedError, match="head dims up to 128"):
        jvp_attention(q, k, v, tq, tk, tv, backend="triton")
    q, k, v, tq, tk, tv = _ins(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float16, bfloat16 or float32"):
        attention(q, k, v, backend="triton")


def test_explicit_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, *_ = _ins()
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        attention(q, k, v, backend="triton")
    # AUTO on CPU takes the reference, never the interpreter
    assert torch.isfinite(attention(q, k, v)).all()

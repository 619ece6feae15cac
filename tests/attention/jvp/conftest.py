import pytest
import torch

from fewer.core import can_run_triton
from fewer.core.capability import triton_interpreter_on


def make_inputs(b, h, lq, lk, d, dtype=torch.float32, *, dv=None, peaked=False, seed=0):
    """q, k, v, tq, tk, tv with random normal entries (never zeros); ``peaked`` gives near one-hot rows."""
    gen = torch.Generator().manual_seed(seed)
    dv = dv or d
    shapes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, dv), (b, h, lq, d), (b, h, lk, d), (b, h, lk, dv)]
    ts = [torch.randn(s, generator=gen) for s in shapes]
    if peaked:
        ts[0] = ts[0] * 6.0
    return [t.to(dtype) for t in ts]


def _kernel_capability():
    if not triton_interpreter_on():
        return False, "Triton kernel tests run on CPU only under TRITON_INTERPRET=1 (or on a CUDA GPU)"
    return can_run_triton("cpu")


_ok, _reason = _kernel_capability()
needs_kernel = pytest.mark.skipif(not _ok, reason=_reason)

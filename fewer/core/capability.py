"""Capability checks. Each returns ``Capability(ok, reason)``, which unpacks as ``ok, reason``.

The reason is always filled, so a skipped test or an unavailable backend can say why.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch


class Capability(NamedTuple):
    ok: bool
    reason: str

    def __bool__(self) -> bool:  # `if has_triton():` reads naturally
        return self.ok


def has_module(name: str) -> Capability:
    if importlib.util.find_spec(name) is None:
        return Capability(False, f"Python package {name!r} is not installed")
    return Capability(True, f"{name} is installed")


def has_cuda() -> Capability:
    if not torch.cuda.is_available():
        return Capability(False, "no CUDA device is visible to torch")
    return Capability(True, f"CUDA device {torch.cuda.get_device_name()}")


def triton_interpreter_on() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU tensors (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_triton() -> Capability:
    found = has_module("triton")
    if not found:
        return Capability(False, "triton is not installed (pip install 'fewer[triton]')")
    return Capability(True, "triton is installed")


def can_run_triton(device: torch.device | str | None = None) -> Capability:
    """Can a Triton kernel run on tensors of this device? CUDA, or CPU under the interpreter."""
    found = has_triton()
    if not found:
        return found
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        if triton_interpreter_on():
            return Capability(True, "Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU")
        return Capability(False, "tensors are on CPU and TRITON_INTERPRET=1 is not set")
    if dev is not None and dev.type != "cuda":
        return Capability(False, f"Triton kernels need CUDA tensors, got device {dev.type!r}")
    if dev is None and triton_interpreter_on():
        return Capability(True, "Triton interpreter (TRITON_INTERPRET=1)")
    cuda = has_cuda()
    if not cuda:
        return cuda
    return Capability(True, "triton and a CUDA device are available")


def sm_at_least(major: int, minor: int = 0) -> Capability:
    cuda = has_cuda()
    if not cuda:
        return cuda
    cap = torch.cuda.get_device_capability()
    if cap < (major, minor):
        return Capability(False, f"needs compute capability >= {major}.{minor}, device has {cap[0]}.{cap[1]}")
    return Capability(True, f"compute capability {cap[0]}.{cap[1]}")


def supports_fp8() -> Capability:
    """FP8 tensor cores (E4M3/E5M2 MMA): Ada (8.9) and Hopper (9.0) or newer."""
    return sm_at_least(8, 9)


def supports_nvfp4() -> Capability:
    """Native FP4 tensor cores: Blackwell (10.0) or newer. Hopper emulates NVFP4."""
    return sm_at_least(10, 0)


def supports_dtype(dtype: torch.dtype, device: torch.device | str) -> Capability:
    dev = torch.device(device)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Capability(False, "this CUDA device has no bf16 support")
    return Capability(True, f"{dtype} on {dev.type}")

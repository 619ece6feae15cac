"""``fewer info``: versions, devices, and which backends can run here, with the reason for each."""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch

from .core import capability


def collect() -> dict[str, Any]:
    from .attention import available_backends

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numpy", "transformers", "tokenizers", "sklearn", "matplotlib"):
        ok, _ = capability.has_module(name)
        if ok:
            try:
                versions[name] = __import__(name).__version__
            except Exception as exc:  # a broken install should not hide the rest of the report
                versions[name] = f"import failed: {exc}"
        else:
            versions[name] = "not installed"

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")

    probe_device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, 1, 1, 1, device=probe_device)
    backends = {}
    for name, backend in sorted(available_backends().items()):
        ok, reason = backend.check(probe)
        backends[f"attention:{name}"] = (ok, reason)

    checks = {
        "triton kernels": capability.can_run_triton(probe_device),
        "fp8 tensor cores": capability.supports_fp8(),
        "nvfp4 tensor cores": capability.supports_nvfp4(),
    }
    for name, cap in checks.items():
        backends[name] = (cap.ok, cap.reason)
    return {"versions": versions, "devices": devices, "backends": backends}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        import json
        print(json.dumps({**info, "backends": {k: {"ok": ok, "reason": r} for k, (ok, r) in info["backends"].items()}},
                         indent=2))
        return 0
    print("versions")
    for k, v in info["versions"].items():
        print(f"  {k:<14} {v}")
    print("devices")
    for d in info["devices"]:
        print(f"  {d}")
    print("backends")
    for k, (ok, reason) in info["backends"].items():
        print(f"  {'yes' if ok else 'no ':<4} {k:<24} {reason}")
    return 0

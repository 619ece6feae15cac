import pytest

from fewer.core import can_run_triton


def pytest_collection_modifyitems(config, items):
    ok, reason = can_run_triton("cpu")
    cuda_ok, _ = can_run_triton("cuda")
    if ok or cuda_ok:
        return
    skip = pytest.mark.skip(reason=f"SLA kernel tests need Triton on CUDA or TRITON_INTERPRET=1: {reason}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: runs the SLA Triton kernels (GPU or TRITON_INTERPRET=1)")

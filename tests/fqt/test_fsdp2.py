"""QuantLinear, OutControl and OsciReset under FSDP2 (2 processes, gloo on CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("FEWER_RUN_SLOW") != "1",
                    reason="starts two processes (about 20 s on CPU); run with FEWER_RUN_SLOW=1")
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_two_processes():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "fqt" / "fsdp2_worker.py")]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = ["rank " + part for part in proc.stdout.split("rank ")[1:]]
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "reset_exact=True" in line and "same_channels=True" in line, line
        assert "outliers_selected=True" in line and "grad=DTensor(64, 128)" in line, line

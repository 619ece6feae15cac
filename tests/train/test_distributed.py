"""DDP and FSDP2 with 2 processes under torchrun, against one process on the same global batches.

Always with gloo on CPU; with NCCL as well on a machine with 2 or more GPUs (the same tests, in fp32).
Starting processes dominates the cost on CPU, so one torchrun launch (``dist_worker.py``) runs every
scenario; the tests below read what it wrote.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewer.core import rel_l2
from fewer.train import load_model_weights
from fewer.train.examples import TinyRegressor
from fewer.train.examples import main as run_example

from .dist_worker import COMMON
from .tolerances import TOLERANCES

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420  # generous: a cold start of 3 Python processes on a loaded 2-core machine


def start_two_processes(out: Path, device: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "train" / "dist_worker.py"), str(out), device]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session we started
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{output[-6000:]}")
    return output


@pytest.fixture(scope="module", params=["cpu", "cuda"], ids=["gloo-cpu", "nccl-cuda"])
def runs(request, tmp_path_factory):
    device = request.param
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL leg needs 2 CUDA devices, this machine has {torch.cuda.device_count()}")
    out = tmp_path_factory.mktemp(f"distributed_{device}")
    proc = start_two_processes(out, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers (torchrun sets OMP_NUM_THREADS=1); see conftest.py
    try:  # the single-process reference runs while the workers start up
        single = run_example(["--distributed", "none", "--device", device, "--out", str(out / "single"), *COMMON])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        torch.set_num_threads(threads)
    return out, single, wait_for(proc)


def params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "final_params.pt", weights_only=True)


def rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_close_to_single(out: Path, name: str) -> None:
    reference, got = params(out / "single"), params(out / name)
    assert sorted(got) == sorted(reference)
    for key in reference:
        assert rel_l2(got[key], reference[key]) <= TOLERANCES["distributed_param_rel_l2"], key
    tol = TOLERANCES["distributed_metric_rel"]
    ref_rows, got_rows = rows(out / "single"), rows(out / name)
    assert [(r["kind"], r["step"]) for r in got_rows] == [(r["kind"], r["step"]) for r in ref_rows]
    for ref, row in zip(ref_rows, got_rows):
        for key in ("loss", "grad_norm", "lr"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], rel=tol), (name, row["step"], key)


def test_ddp_matches_single_process(runs):
    out, _, _ = runs
    assert_close_to_single(out, "ddp")


def test_ddp_with_gradient_accumulation_matches_single_process(runs):
    out, _, _ = runs
    assert_close_to_single(out, "ddp_accum")


def test_fsdp2_with_gradient_accumulation_matches_single_process(runs):
    out, _, _ = runs
    assert_close_to_single(out, "fsdp2")


def test_fsdp2_dcp_resume_equals_the_uninterrupted_run(runs):
    out, _, _ = runs
    whole, resumed = params(out / "fsdp2"), params(out / "fsdp2_resumed")
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    latest = (out / "fsdp2_resumed" / "checkpoints" / "latest").read_text()
    assert latest == "step_00000020"


def test_sharded_checkpoint_loads_into_one_process(runs):
    out, _, _ = runs
    ckpt = out / "fsdp2_resumed" / "checkpoints" / "step_00000020"
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    model = load_model_weights(TinyRegressor(), ckpt)
    expected = params(out / "fsdp2")
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_every_run_prints_its_checksum(runs):
    _, single, output = runs
    lines = [line for line in output.splitlines() if line.startswith("final params checksum")]
    assert len(lines) == 5  # ddp, ddp_accum, fsdp2, fsdp2 stopped at 8, fsdp2 resumed; rank 0 only
    assert "step=8 " in lines[3] and "step=20 " in lines[4]
    assert single["step"] == 20 and len(single["sha256"]) == 16

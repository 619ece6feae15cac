"""Nsight Compute evidence for the JVP kernel: one launch of the tuned kernel and one cuDNN forward.

    ncu --profile-from-start off --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy \\
        python3 benchmarks/attention/profile_jvp.py [--L 8192] [--D 128]

Autotuning and warm-up run outside the profiled range (cudaProfilerStart/Stop bracket one launch
of each), so ncu replays exactly the two kernels the benchmark times.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewer.attention.jvp import jvp_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--L", type=int, default=8192)
    parser.add_argument("--D", type=int, default=128)
    args = parser.parse_args()
    shape = (args.B, args.H, args.L, args.D)
    q, k, v, tq, tk, tv = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(6))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    for _ in range(3):  # autotune + warm-up, not profiled
        jvp_attention(q, k, v, tq, tk, tv, backend="triton")
        cudnn()
    torch.cuda.synchronize()
    profiler = torch.cuda.cudart()
    profiler.cudaProfilerStart()
    jvp_attention(q, k, v, tq, tk, tv, backend="triton")
    cudnn()
    torch.cuda.synchronize()
    profiler.cudaProfilerStop()
    print("profiled one JVP kernel launch and one cuDNN forward at", shape)


if __name__ == "__main__":
    main()

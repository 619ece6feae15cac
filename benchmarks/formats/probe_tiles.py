"""Probe every fused-quantizer layout of the benchmark sweep on the GPU, bit for bit against the PyTorch twin.

    PYTHONPATH=. python3 benchmarks/formats/probe_tiles.py     # ~140 s on an H200 (14 parallel workers)

Each (format, rounding, layout, grid) runs in its own subprocess with CUDA_LAUNCH_BLOCKING=1, so an illegal
address in one layout cannot take the others down. The layouts are the benchmark's (``candidates``), plus the
default (no tile given); the first layout is also tried with one program per tile instead of the persistent grid.
Found (H200, 2026-11-27): per-tensor NVFP4 row codes wrong unless 128 rows and vec=4 (now refused on CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from bench_quantize import FUSED_FORMATS, candidates  # noqa: E402

ONE_LAYOUT = r'''
import sys, torch
from fewer.formats import quantize
from fewer.formats.triton_kernels import fused_quantize
name, rounding, BM, BK, warps, vec, per_sm = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
g = torch.Generator(device="cuda").manual_seed(0)
x = (torch.randn(512, 1024, device="cuda", generator=g) * 3).to(torch.bfloat16)
seed = 5 if rounding == "stochastic" else None
ref_row = quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0)
ref_col = quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1)
layout = {} if BM == 0 else dict(tile=(BM, BK), num_warps=warps, vec=vec)
row, col = fused_quantize(x, name, rounding=rounding, seed=seed, programs_per_sm=per_sm or None, **layout)
torch.cuda.synchronize()
bad = []
for tag, got, ref in (("row", row, ref_row), ("col", col, ref_col)):
    data = (got.data.view(torch.uint8) != ref.data.view(torch.uint8)).sum().item()
    scale = (got.scale.view(torch.uint8) != ref.scale.view(torch.uint8)).sum().item()
    if data or scale:
        bad.append(f"{tag}: {data} data bytes, {scale} scale bytes differ")
print("OK" if not bad else "MISMATCH " + "; ".join(bad))
'''
DEFAULT = (0, 0, 0, 0)       # no tile argument: the kernel's default layout
ONE_PER_TILE = 1 << 20       # programs_per_sm large enough for one program per tile


def jobs() -> list[list[str]]:
    out = []
    for name in FUSED_FORMATS:
        layouts = [DEFAULT, *candidates(name)]
        for rounding in ("nearest", "stochastic"):
            for i, layout in enumerate(layouts):
                for per_sm in ((0, ONE_PER_TILE) if i < 2 else (0,)):
                    out.append([name, rounding, *map(str, layout), str(per_sm)])
    return out


def probe(args: list[str]) -> tuple[list[str], str]:
    try:
        r = subprocess.run([sys.executable, "-c", ONE_LAYOUT, *args], capture_output=True, text=True, timeout=150,
                           env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    except subprocess.TimeoutExpired:
        return args, "TIMEOUT"
    if r.returncode != 0:
        return args, (r.stderr.strip().splitlines() or ["?"])[-1][:150]
    return args, (r.stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    with ThreadPoolExecutor(14) as pool:
        for (name, rounding, BM, BK, warps, vec, per_sm), result in pool.map(probe, jobs()):
            layout = "default" if BM == "0" else f"({BM},{BK},w{warps},v{vec})"
            grid = "one-per-tile" if per_sm != "0" else "persistent"
            print(name, rounding, layout, grid, "->", result, flush=True)


if __name__ == "__main__":
    main()

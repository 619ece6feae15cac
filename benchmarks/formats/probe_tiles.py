"""Probe every fused-quantizer layout of the benchmark sweep on the GPU, one subprocess each (an illegal
address in one layout cannot take the others down), bit for bit against the PyTorch twin.

    PYTHONPATH=. python3 benchmarks/formats/probe_tiles.py     # ~140 s on an H200 (14 parallel workers)

Found (H200, 2026-11-27): per-tensor NVFP4 row codes wrong unless 128 rows and vec=4 (now refused on CUDA).
"""
import subprocess, sys, os
CODE = r'''
import sys, torch
from fewer.formats import quantize
from fewer.formats.triton_kernels import fused_quantize
name, rounding, BM, BK, warps, vec, per_sm = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
per_sm = None if per_sm == 0 else per_sm
g = torch.Generator(device="cuda").manual_seed(0)
x = (torch.randn(512, 1024, device="cuda", generator=g) * 3).to(torch.bfloat16)
seed = 5 if rounding == "stochastic" else None
ref_row = quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0)
ref_col = quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1)
kw = {} if BM == 0 else dict(tile=(BM, BK), num_warps=warps, vec=vec)
row, col = fused_quantize(x, name, rounding=rounding, seed=seed, programs_per_sm=per_sm, **kw)
torch.cuda.synchronize()
bad = []
for tag, got, ref in (("row", row, ref_row), ("col", col, ref_col)):
    d = (got.data.view(torch.uint8) != ref.data.view(torch.uint8)).sum().item()
    s = (got.scale.view(torch.uint8) != ref.scale.view(torch.uint8)).sum().item()
    if d or s: bad.append(f"{tag}: {d} data bytes, {s} scale bytes differ")
print("OK" if not bad else "MISMATCH " + "; ".join(bad))
'''
TILES = [(0,0,0,0), (128, 64, 4, 4), (64, 64, 2, 4), (64, 128, 4, 4), (128, 128, 8, 4), (128, 64, 8, 2), (128, 128, 4, 8)]
TILES_128 = [(0,0,0,0), (128, 128, 8, 4), (128, 128, 16, 2), (128, 128, 4, 8), (256, 128, 16, 4)]
jobs = []
for name in ["nvfp4", "nvfp4_2d", "nvfp4_double", "mxfp4", "mxfp8", "mxfp8_e5m2", "int8_block1d", "fp8_e4m3_block", "fp8_e5m2_block"]:
    tiles = TILES_128[:4] if name == "nvfp4_double" else (TILES_128 if name.startswith(("int8", "fp8")) else TILES)
    for rounding in ("nearest", "stochastic"):
        for t in tiles:
            for per_sm in ((0, 1 << 20) if t == tiles[0] or t == tiles[1] else (0,)):
                jobs.append([name, rounding, *map(str, t), str(per_sm)])

def run(args):
    try:
        r = subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, timeout=150,
                           env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    except subprocess.TimeoutExpired:
        return args, "TIMEOUT"
    out = (r.stdout.strip().splitlines() or [""])[-1]
    err = "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:150]
    return args, out or err

from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(14) as pool:
    for args, res in pool.map(run, jobs):
        name, rounding, BM, BK, w, v, per_sm = args
        tile = "default" if BM == "0" else f"({BM},{BK},w{w},v{v})"
        print(name, rounding, tile, "one-per-tile" if per_sm != "0" else "persistent", "->", res, flush=True)

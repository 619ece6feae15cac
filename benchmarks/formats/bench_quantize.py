"""Throughput of the fused quantizers (row-wise + transposed column-wise operand in one pass).

GB/s counts bytes read plus bytes written once each: the bf16 input once, every code, scale and
outer scale written. The baseline is a device-to-device copy (``dst.copy_(src)``) of a same-size
bf16 tensor, timed in the same run, counting its read and its write. NVFP4 with a per-tensor scale
needs the tensor amax first; its row is timed with the amax kernel included (one more read of the
input, not counted in the bytes), and "amax given" (delayed scaling) without it.

Before timing, every format and rounding is checked on the GPU against the PyTorch reference
(``fewer.formats.quantize`` run on the same GPU): codes and scales must agree bit for bit.

    PYTHONPATH=. python3 benchmarks/formats/bench_quantize.py            # GPU
    TRITON_INTERPRET=1 python benchmarks/formats/bench_quantize.py --smoke  # CPU smoke (tiny shapes)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fewer import bench  # noqa: E402
from fewer.core import sqnr_db  # noqa: E402
from fewer.formats import quantize  # noqa: E402
from fewer.formats.triton_kernels import FUSED_FORMATS, fused_quantize  # noqa: E402

SHAPES = {"llm_square": (8192, 8192), "llm_tall": (16384, 4096)}
CHECK_SHAPES = [(1024, 2048), (384, 640), (96, 160)]
# (BM, BK, num_warps) candidates; outer128 formats need 128x128 tiles
TILES = [(64, 64, 4), (64, 64, 2), (64, 128, 4), (128, 128, 8)]
TILES_OUTER = [(128, 128, 8), (128, 128, 16)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.element_size() != b.element_size():
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def operand_equal(fused, ref) -> bool:
    ok = same_bits(fused.data, ref.data) and same_bits(fused.scale, ref.scale)
    if ref.outer_scale is not None:
        ok = ok and same_bits(fused.outer_scale.reshape(ref.outer_scale.shape), ref.outer_scale)
    return ok


def check(device: str, shapes) -> list[dict]:
    rows = []
    for M, K in shapes:
        x = (torch.randn(M, K, device=device) * torch.rand(M, 1, device=device).pow(3) * 10).to(torch.bfloat16)
        x[0, 0] = 300.0                                           # an outlier
        for name in FUSED_FORMATS:
            for rounding in ("nearest", "stochastic"):
                seed = 1234 if rounding == "stochastic" else None
                try:
                    row, col = fused_quantize(x, name, rounding=rounding, seed=seed)
                except ValueError:          # the shape is not a multiple of this format's block
                    continue
                ref_row = quantize(x, name, dim=1, rounding=rounding, seed=seed, stream=0)
                ref_col = quantize(x, name, dim=0, rounding=rounding, seed=seed, stream=1)
                ok_row, ok_col = operand_equal(row, ref_row), operand_equal(col, ref_col)
                rows.append({"shape": f"{M}x{K}", "format": name, "rounding": rounding,
                             "row_bitexact": ok_row, "col_bitexact": ok_col,
                             "row_sqnr_db": round(sqnr_db(row.dequantize(), x.float()), 2)})
    return rows


def output_bytes(row, col) -> int:
    return sum(q.nbytes() for q in (row, col) if q is not None)


def bench_shape(label: str, M: int, K: int, copy_gbs: float, tune: bool, chosen: dict) -> list[dict]:
    """Time every fused format; tiles are swept on the first shape (``tune``) and reused from ``chosen`` after."""
    x = torch.randn(M, K, device="cuda", dtype=torch.float32).mul_(2).to(torch.bfloat16)
    in_bytes = x.numel() * x.element_size()
    rows = []
    for name in FUSED_FORMATS:
        for rounding in ("nearest", "stochastic"):
            seed = 7 if rounding == "stochastic" else None
            candidates = TILES_OUTER if name == "nvfp4_double" else TILES
            best = None
            key = (name, rounding)
            for BM, BK, warps in (candidates if tune else [chosen.get(key, candidates[-1])]):
                fn = lambda: fused_quantize(x, name, rounding=rounding, seed=seed, tile=(BM, BK), num_warps=warps)  # noqa: E731
                try:
                    t = bench.time_ms(fn)["median_ms"]
                except Exception as exc:  # a tile that does not compile: record and move on
                    print(f"  {name} {BM}x{BK} w{warps}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if best is None or t < best[0]:
                    best = (t, BM, BK, warps)
            if best is None:
                continue
            t, BM, BK, warps = best
            chosen[key] = (BM, BK, warps)
            row, col = fused_quantize(x, name, rounding=rounding, seed=seed, tile=(BM, BK), num_warps=warps)
            nbytes = in_bytes + output_bytes(row, col)
            gbs = nbytes / (t * 1e-3) / 1e9
            rows.append({"shape": label, "M": M, "K": K, "format": name, "rounding": rounding,
                         "variant": "fused row+col", "tile": f"{BM}x{BK}", "num_warps": warps,
                         "median_ms": round(t, 4), "bytes": nbytes, "gbs": round(gbs, 1),
                         "copy_gbs": round(copy_gbs, 1), "pct_of_copy": round(100 * gbs / copy_gbs, 1),
                         "row_sqnr_db": round(sqnr_db(row.dequantize(), x.float()), 2)})
            base = rows[-1]
            if name in ("nvfp4", "mxfp8") and rounding == "nearest":
                for only, kw in (("row only", dict(colwise=False)), ("col only", dict(rowwise=False))):
                    fn = lambda: fused_quantize(x, name, tile=(BM, BK), num_warps=warps, **kw)  # noqa: E731
                    t1 = bench.time_ms(fn)["median_ms"]
                    r1, c1 = fn()
                    nb = in_bytes + output_bytes(r1, c1)
                    rows.append({**base, "variant": f"fused {only}", "median_ms": round(t1, 4), "bytes": nb,
                                 "gbs": round(nb / (t1 * 1e-3) / 1e9, 1),
                                 "pct_of_copy": round(100 * nb / (t1 * 1e-3) / 1e9 / copy_gbs, 1)})
            if name == "nvfp4" and rounding == "nearest":
                amax = x.abs().amax().float()
                fn = lambda: fused_quantize(x, name, tile=(BM, BK), num_warps=warps, tensor_amax_value=amax)  # noqa: E731
                t2 = bench.time_ms(fn)["median_ms"]
                gbs2 = nbytes / (t2 * 1e-3) / 1e9
                rows.append({**base, "variant": "fused row+col, amax given", "median_ms": round(t2, 4),
                             "gbs": round(gbs2, 1), "pct_of_copy": round(100 * gbs2 / copy_gbs, 1)})
            print(f"  {label} {name:15s} {rounding:10s} {base['tile']} w{warps}: {t:.3f} ms "
                  f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)", flush=True)
    # the unfused PyTorch reference, for scale (one format, RTN)
    for name in ("nvfp4", "mxfp4"):
        fn = lambda: (quantize(x, name, dim=1, check_finite=False), quantize(x, name, dim=0, check_finite=False))  # noqa: E731
        t = bench.time_ms(fn, warmup=5, rep=20)["median_ms"]
        row, col = fn()
        nbytes = in_bytes + output_bytes(row, col)
        gbs = nbytes / (t * 1e-3) / 1e9
        rows.append({"shape": label, "M": M, "K": K, "format": name, "rounding": "nearest",
                     "variant": "torch reference (unfused)", "tile": "-", "num_warps": "-", "median_ms": round(t, 4),
                     "bytes": nbytes, "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1),
                     "pct_of_copy": round(100 * gbs / copy_gbs, 1), "row_sqnr_db": ""})
    return rows


def copy_bandwidth(M: int, K: int) -> float:
    src = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench.time_ms(lambda: dst.copy_(src))["median_ms"]
    return 2 * src.numel() * src.element_size() / (t * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU/interpreter: correctness on tiny shapes only")
    parser.add_argument("--no-tune", action="store_true", help="one tile per format instead of a small sweep")
    parser.add_argument("--out", default=None, help="also write the CSVs here (e.g. $OUT)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke or not torch.cuda.is_available():
        rows = check("cpu", [(128, 128), (96, 160)])
        bench.print_table(rows)
        return 0 if all(r["row_bitexact"] and r["col_bitexact"] for r in rows) else 1
    start = time.time()
    env = bench.environment()
    print("environment:", env, flush=True)
    check_rows = check("cuda", CHECK_SHAPES)
    bench.print_table(check_rows)
    all_ok = all(r["row_bitexact"] and r["col_bitexact"] for r in check_rows)
    print(f"GPU bit-exactness vs reference: {'ALL OK' if all_ok else 'MISMATCH'} ({time.time() - start:.0f}s)", flush=True)
    rows = []
    chosen: dict = {}
    for i, (label, (M, K)) in enumerate(SHAPES.items()):
        copy_gbs = copy_bandwidth(M, K)
        print(f"{label} {M}x{K}: copy {copy_gbs:.0f} GB/s", flush=True)
        rows.append({"shape": label, "M": M, "K": K, "format": "bf16 copy", "rounding": "-", "variant": "copy_",
                     "tile": "-", "num_warps": "-", "median_ms": "", "bytes": 4 * M * K, "gbs": round(copy_gbs, 1),
                     "copy_gbs": round(copy_gbs, 1), "pct_of_copy": 100.0, "row_sqnr_db": ""})
        rows += bench_shape(label, M, K, copy_gbs, tune=(i == 0 and not args.no_tune), chosen=chosen)
    paths = [bench.write_csv(rows, "formats", "quantize"), bench.write_csv(check_rows, "formats", "quantize_check")]
    if args.out:
        paths += [bench.write_csv(rows, "formats", "quantize", results_dir=args.out),
                  bench.write_csv(check_rows, "formats", "quantize_check", results_dir=args.out)]
    print("wrote", *paths)
    summary = [{k: r[k] for k in ("shape", "format", "rounding", "variant", "tile", "median_ms", "gbs", "pct_of_copy")}
               for r in rows]
    print(f"\nGPU: {env['gpu']}   bit-exact: {all_ok}   total {time.time() - start:.0f}s")
    bench.print_table(summary)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

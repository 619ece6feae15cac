"""Throughput of the fused quantizers (row-wise + transposed column-wise operand in one pass).

GB/s counts bytes read plus bytes written once each: the bf16 input once, every code, scale and
outer scale written. The baseline is a device-to-device copy (``dst.copy_(src)``) of a same-size
bf16 tensor, timed the same way in the same run, counting its read and its write. NVFP4 with a
per-tensor scale needs the tensor amax first; its row is timed with the amax kernel included (one
more read of the input, not counted in ``bytes``; ``bytes_moved`` counts it), and "amax given"
(delayed scaling) without it.

Timing: each quantizer call (and the copy) is captured in a CUDA graph of 20 back-to-back calls and
the graph is replayed; the median over replays, divided by 20, is the kernel time without Python
launch overhead. ``eager_ms`` is do_bench's median of plain calls, for reference.

Before timing, every format and rounding is checked on the GPU against the PyTorch reference
(``fewer.formats.quantize`` run on the same GPU): codes and scales must agree bit for bit. Every
tile of the sweep is checked against the checked default tile on the benchmark input (bitwise).
All kernels are compiled up front in parallel worker processes (Triton's on-disk cache).

    PYTHONPATH=. python3 benchmarks/formats/bench_quantize.py --out $OUT      # GPU
    TRITON_INTERPRET=1 python benchmarks/formats/bench_quantize.py --smoke  # CPU smoke (tiny shapes)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fewer import bench  # noqa: E402
from fewer.core import sqnr_db  # noqa: E402
from fewer.formats import quantize  # noqa: E402
from fewer.formats import triton_kernels  # noqa: E402
from fewer.formats.triton_kernels import FUSED_FORMATS, default_tile, fused_quantize  # noqa: E402
from fewer.formats.spec import get_spec  # noqa: E402

SHAPES = {"llm_square": (8192, 8192), "llm_tall": (16384, 4096)}
CHECK_SHAPES = [(1024, 2048), (384, 640), (96, 160)]
# (BM, BK, num_warps, vec) candidates; the first is the default. 128-blocks and outer128 need BK = 128
TILES = [(128, 64, 4, 4), (64, 64, 2, 4), (64, 128, 4, 4), (128, 128, 8, 4), (128, 64, 8, 2), (128, 128, 4, 8)]
TILES_128 = [(128, 128, 8, 4), (128, 128, 16, 2), (128, 128, 4, 8), (256, 128, 16, 4)]
HW_COL_FORMATS = ("fp8_e4m3_block", "fp8_e5m2_block", "mxfp8", "mxfp8_e5m2")
GRAPH_CALLS = 20
DEADLINE_S = float(os.environ.get("FEWER_BENCH_DEADLINE_S", "200"))


def candidates(name: str):
    spec = get_spec(name)
    if spec.second_level == "outer128":
        return TILES_128[:3]
    return TILES_128 if spec.block_shape[1] >= 128 else TILES


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
        x[M // 2, :32] = 0.0                                      # an all-zero block
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
                             "row_sqnr_db": safe_sqnr(row, x)})
        if (M, K) != shapes[0]:
            continue
        for name, scale_rounding in (("nvfp4", "up"), ("nvfp4", "headroom"), ("nvfp4_double", "up"), ("mxfp4", "up")):
            for rounding in ("nearest", "stochastic"):
                seed = 99 if rounding == "stochastic" else None
                kw = dict(rounding=rounding, seed=seed, scale_rounding=scale_rounding)
                row, col = fused_quantize(x, name, **kw)
                rows.append({"shape": f"{M}x{K}", "format": name, "rounding": f"{rounding} (scales {scale_rounding})",
                             "row_bitexact": operand_equal(row, quantize(x, name, dim=1, stream=0, **kw)),
                             "col_bitexact": operand_equal(col, quantize(x, name, dim=0, stream=1, **kw)),
                             "row_sqnr_db": safe_sqnr(row, x)})
    return rows


def safe_sqnr(q, x) -> float:
    try:
        return round(sqnr_db(q.dequantize(), x.float()), 2)
    except (ValueError, ZeroDivisionError):       # inf/nan in a dequantized operand: recorded, not fatal
        return float("nan")


def output_bytes(row, col) -> int:
    return sum(q.nbytes() for q in (row, col) if q is not None)


def graph_ms(fn, calls: int = GRAPH_CALLS, reps: int = 15) -> float:
    """Median time of one call, from replays of a CUDA graph of ``calls`` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    times.sort()
    return times[len(times) // 2]


def auto_prefetch(name: str, rounding: str) -> bool:
    """The kernel's default register-prefetch choice (triton_kernels.default_prefetch)."""
    return triton_kernels.default_prefetch(get_spec(name), rounding)


def resident_programs(n_regs, warps: int) -> int:
    """Programs of ``warps`` warps that fit on one SM at once by registers (256-register warp granules)."""
    if not isinstance(n_regs, int) or n_regs <= 0:
        return 2
    per_warp = -(-n_regs * 32 // 256) * 256
    return max(1, min(65536 // (per_warp * warps), 64 // warps, 32))


def kernel_stats() -> dict:
    k = triton_kernels.LAST_COMPILED
    return {"n_regs": getattr(k, "n_regs", ""), "n_spills": getattr(k, "n_spills", "")}


def configs_to_compile() -> list[tuple]:
    out = []
    for name in FUSED_FORMATS:
        for rounding in ("nearest", "stochastic"):
            for BM, BK, warps, vec in candidates(name):
                out.append((name, rounding, BM, BK, warps, vec, True, True, True))
                out.append((name, rounding, BM, BK, warps, vec, True, True, True, None, "flip"))
    for name in ("nvfp4", "mxfp8"):
        for rowwise, colwise in ((True, False), (False, True)):
            for BM, BK, warps, vec in candidates(name):
                out.append((name, "nearest", BM, BK, warps, vec, rowwise, colwise, True))
    for name in HW_COL_FORMATS:
        for BM, BK, warps, vec in candidates(name):
            out.append((name, "nearest", BM, BK, warps, vec, True, True, False))
    for name, scale_rounding in (("nvfp4", "up"), ("nvfp4", "headroom"), ("nvfp4_double", "up"), ("mxfp4", "up")):
        for rounding in ("nearest", "stochastic"):
            out.append((name, rounding, *candidates(name)[0], True, True, True, scale_rounding))
    return out


def _compile_worker(cfgs) -> list[str]:
    torch.cuda.set_device(0)
    x = torch.randn(256, 256, device="cuda").to(torch.bfloat16)
    errors = []
    for name, rounding, BM, BK, warps, vec, rowwise, colwise, hw_cvt, *extra in cfgs:
        triton_kernels.HW_ELEMENT_CVT = hw_cvt
        scale_rounding = extra[0] if extra else None
        triton_kernels.PREFETCH = (not auto_prefetch(name, rounding)) if extra[1:] == ["flip"] else None
        try:
            fused_quantize(x, name, rounding=rounding, seed=3 if rounding == "stochastic" else None, tile=(BM, BK),
                           num_warps=warps, vec=vec, rowwise=rowwise, colwise=colwise, scale_rounding=scale_rounding)
        except Exception as exc:  # recorded; the timing loop skips it too
            errors.append(f"{name} {rounding} {BM}x{BK} w{warps} v{vec}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            triton_kernels.PREFETCH = None
    torch.cuda.synchronize()
    return errors


def precompile(workers: int) -> None:
    cfgs = configs_to_compile()
    chunks = [cfgs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for errs in pool.map(_compile_worker, chunks):
            for e in errs:
                print("  compile:", e, flush=True)


def bench_shape(label: str, M: int, K: int, copy_gbs: float, tune: bool, chosen: dict, start: float,
                sweep_rows: list) -> list[dict]:
    """Time every fused format; tiles are swept on the first shape (``tune``) and reused from ``chosen`` after."""
    x = torch.randn(M, K, device="cuda", dtype=torch.float32).mul_(2).to(torch.bfloat16)
    in_bytes = x.numel() * x.element_size()
    rows = []
    for name in FUSED_FORMATS:
        for rounding in ("nearest", "stochastic"):
            seed = 7 if rounding == "stochastic" else None
            key = (name, rounding)
            triton_kernels.PREFETCH = None
            if tune and time.time() - start < DEADLINE_S:
                cands = [(*c, None) for c in candidates(name)]
            else:
                cands = [chosen.get(key, (*candidates(name)[0], None))]
            ref_row, ref_col = fused_quantize(x, name, rounding=rounding, seed=seed)     # default tile (checked)
            best = None
            for BM, BK, warps, vec, per_sm in cands:
                try:
                    r, c = fused_quantize(x, name, rounding=rounding, seed=seed, tile=(BM, BK), num_warps=warps, vec=vec,
                                          programs_per_sm=1 << 20)
                    stats = kernel_stats()
                except Exception as exc:  # a tile that does not compile: record and move on
                    print(f"  {name} {BM}x{BK} w{warps} v{vec}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                # persistent grid with as many programs as fit on an SM at once, or one program per tile; and the
                # register prefetch of the next tile as the kernel picks it, or flipped (v4)
                auto = auto_prefetch(name, rounding)
                modes = [per_sm] if per_sm is not None else [
                    (resident_programs(stats["n_regs"], warps), auto), (1 << 20, auto), (None, not auto)]
                for psm, pf in modes:
                    def fn():
                        triton_kernels.PREFETCH = pf
                        try:
                            return fused_quantize(x, name, rounding=rounding, seed=seed, tile=(BM, BK),  # noqa: B023
                                                  num_warps=warps, vec=vec, programs_per_sm=psm)  # noqa: B023
                        finally:
                            triton_kernels.PREFETCH = None
                    r, c = fn()
                    st = kernel_stats()
                    if psm is None:
                        psm = resident_programs(st["n_regs"], warps)
                    same = operand_equal(r, ref_row) and operand_equal(c, ref_col)
                    t = graph_ms(fn)
                    if tune:
                        sweep_rows.append({"shape": label, "format": name, "rounding": rounding, "tile": f"{BM}x{BK}",
                                           "num_warps": warps, "vec": vec, "programs_per_sm": psm, "prefetch": pf,
                                           "median_ms": round(t, 4), "same_as_default": same, **st})
                    if not same:
                        print(f"  {name} {rounding} {BM}x{BK} w{warps} v{vec} p{psm}: DIFFERS from the default tile",
                              flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, BM, BK, warps, vec, (psm, pf), st)
            if best is None:
                continue
            t, BM, BK, warps, vec, (psm, pf), stats = best
            chosen[key] = (BM, BK, warps, vec, (psm, pf))
            triton_kernels.PREFETCH = pf          # the chosen prefetch for every timing of this format below
            kw = dict(rounding=rounding, seed=seed, tile=(BM, BK), num_warps=warps, vec=vec, programs_per_sm=psm)
            row, col = fused_quantize(x, name, **kw)
            nbytes = in_bytes + output_bytes(row, col)
            moved = nbytes + (in_bytes if name == "nvfp4" else 0)
            eager = bench.time_ms(lambda: fused_quantize(x, name, **kw))["median_ms"]  # noqa: B023
            gbs = nbytes / (t * 1e-3) / 1e9
            variant = "fused row+col" + (" (incl. amax pass)" if name == "nvfp4" else "")
            rows.append({"shape": label, "M": M, "K": K, "format": name, "rounding": rounding,
                         "variant": variant, "tile": f"{BM}x{BK}", "num_warps": warps, "vec": vec,
                         "programs_per_sm": psm, "prefetch": pf,
                         "median_ms": round(t, 4), "eager_ms": round(eager, 4), "bytes": nbytes, "bytes_moved": moved,
                         "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1), "pct_of_copy": round(100 * gbs / copy_gbs, 1),
                         "row_sqnr_db": safe_sqnr(row, x), **stats})
            base = rows[-1]
            print(f"  {label} {name:15s} {rounding:10s} {base['tile']} w{warps} v{vec} p{psm} pf{int(pf)}: {t:.4f} ms "
                  f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy) regs {stats['n_regs']} spills {stats['n_spills']}",
                  flush=True)
            if name == "nvfp4":
                amax = x.abs().amax().float()
                t2 = graph_ms(lambda: fused_quantize(x, name, tensor_amax_value=amax, **kw))  # noqa: B023
                gbs2 = nbytes / (t2 * 1e-3) / 1e9
                rows.append({**base, "variant": "fused row+col, amax given", "median_ms": round(t2, 4), "eager_ms": "",
                             "bytes_moved": nbytes, "gbs": round(gbs2, 1), "pct_of_copy": round(100 * gbs2 / copy_gbs, 1)})
                print(f"  {label} {name:15s} {rounding:10s} amax given: {t2:.4f} ms {gbs2:.0f} GB/s "
                      f"({100 * gbs2 / copy_gbs:.0f}% of copy)", flush=True)
            if name in ("nvfp4", "mxfp8") and rounding == "nearest":
                for only, okw in (("row only", dict(colwise=False)), ("col only", dict(rowwise=False))):
                    fn = lambda: fused_quantize(x, name, tile=(BM, BK), num_warps=warps, vec=vec,  # noqa: E731
                                                programs_per_sm=psm, **okw)
                    r1, c1 = fn()
                    st1 = kernel_stats()
                    t1 = graph_ms(fn)
                    nb = in_bytes + output_bytes(r1, c1)
                    rows.append({**base, "variant": f"fused {only}", "median_ms": round(t1, 4), "eager_ms": "",
                                 "bytes": nb, "bytes_moved": nb + (in_bytes if name == "nvfp4" else 0),
                                 "gbs": round(nb / (t1 * 1e-3) / 1e9, 1),
                                 "pct_of_copy": round(100 * nb / (t1 * 1e-3) / 1e9 / copy_gbs, 1), **st1})
    # the unfused PyTorch reference, for scale (one format, RTN)
    for name in ("nvfp4", "mxfp4"):
        fn = lambda: (quantize(x, name, dim=1, check_finite=False), quantize(x, name, dim=0, check_finite=False))  # noqa: E731
        t = bench.time_ms(fn, warmup=5, rep=20)["median_ms"]
        row, col = fn()
        nbytes = in_bytes + output_bytes(row, col)
        gbs = nbytes / (t * 1e-3) / 1e9
        rows.append({"shape": label, "M": M, "K": K, "format": name, "rounding": "nearest",
                     "variant": "torch reference (unfused)", "tile": "-", "num_warps": "-", "vec": "-", "programs_per_sm": "-",
                     "median_ms": round(t, 4), "eager_ms": round(t, 4), "bytes": nbytes, "bytes_moved": nbytes,
                     "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1),
                     "pct_of_copy": round(100 * gbs / copy_gbs, 1), "row_sqnr_db": "", "n_regs": "", "n_spills": ""})
    return rows


def ablation_no_hw_cvt(label: str, M: int, K: int, copy_gbs: float, chosen: dict) -> tuple[list, list]:
    """FP8 RTN with the hardware cvt off (arithmetic element codes in both directions): bit-exactness and time."""
    checks, rows = [], []
    triton_kernels.HW_ELEMENT_CVT = False
    try:
        for cm, ck in CHECK_SHAPES[:2]:
            xc = (torch.randn(cm, ck, device="cuda") * torch.rand(cm, 1, device="cuda").pow(3) * 10).to(torch.bfloat16)
            for name in HW_COL_FORMATS:
                row, col = fused_quantize(xc, name)
                checks.append({"shape": f"{cm}x{ck}", "format": name, "rounding": "nearest (hardware cvt off)",
                               "row_bitexact": operand_equal(row, quantize(xc, name, dim=1)),
                               "col_bitexact": operand_equal(col, quantize(xc, name, dim=0)),
                               "row_sqnr_db": safe_sqnr(row, xc)})
        x = torch.randn(M, K, device="cuda", dtype=torch.float32).mul_(2).to(torch.bfloat16)
        for name in HW_COL_FORMATS:
            BM, BK, warps, vec, (psm, pf) = chosen.get((name, "nearest"), (*candidates(name)[0], (None, None)))
            triton_kernels.PREFETCH = pf
            fn = lambda: fused_quantize(x, name, tile=(BM, BK), num_warps=warps, vec=vec, programs_per_sm=psm)  # noqa: E731
            r, c = fn()
            stats = kernel_stats()
            t = graph_ms(fn)
            nbytes = x.numel() * 2 + output_bytes(r, c)
            gbs = nbytes / (t * 1e-3) / 1e9
            rows.append({"shape": label, "M": M, "K": K, "format": name, "rounding": "nearest",
                         "variant": "fused row+col, hardware cvt off", "tile": f"{BM}x{BK}", "num_warps": warps,
                         "vec": vec, "programs_per_sm": psm, "median_ms": round(t, 4), "eager_ms": "",
                         "bytes": nbytes, "bytes_moved": nbytes, "gbs": round(gbs, 1), "copy_gbs": round(copy_gbs, 1),
                         "pct_of_copy": round(100 * gbs / copy_gbs, 1), "row_sqnr_db": safe_sqnr(r, x), **stats})
            print(f"  {label} {name:15s} hardware cvt off: {t:.4f} ms {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)",
                  flush=True)
    finally:
        triton_kernels.HW_ELEMENT_CVT = True
        triton_kernels.PREFETCH = None
    return checks, rows


def copy_bandwidth(M: int, K: int) -> tuple[float, float]:
    src = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = graph_ms(lambda: dst.copy_(src))
    t_eager = bench.time_ms(lambda: dst.copy_(src))["median_ms"]
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / (t * 1e-3) / 1e9, nbytes / (t_eager * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU/interpreter: correctness on tiny shapes only")
    parser.add_argument("--no-tune", action="store_true", help="one tile per format instead of a small sweep")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument("--out", default=None, help="also write the CSVs here (e.g. $OUT)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the hardware-cvt-off ablation")
    parser.add_argument("--tag", default="v4", help="suffix of the CSV names (formats_quantize_<tag>.csv, ...)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke or not torch.cuda.is_available():
        rows = check("cpu", [(128, 128), (96, 160)])
        bench.print_table(rows)
        return 0 if all(r["row_bitexact"] and r["col_bitexact"] for r in rows) else 1
    start = time.time()
    env = bench.environment()
    print("environment:", env, flush=True)
    if args.workers > 1:
        precompile(args.workers)
        print(f"compiled {len(configs_to_compile())} kernels in {time.time() - start:.0f}s", flush=True)
    check_rows = check("cuda", CHECK_SHAPES)
    bad = [r for r in check_rows if not (r["row_bitexact"] and r["col_bitexact"])]
    all_ok = not bad
    if bad:
        bench.print_table(bad)
    print(f"GPU bit-exactness vs reference: {'ALL OK' if all_ok else 'MISMATCH'} ({len(check_rows)} cases, "
          f"{time.time() - start:.0f}s)", flush=True)
    rows, sweep_rows = [], []
    chosen: dict = {}
    paths = []
    for i, (label, (M, K)) in enumerate(SHAPES.items()):
        copy_gbs, copy_eager = copy_bandwidth(M, K)
        print(f"{label} {M}x{K}: copy {copy_gbs:.0f} GB/s (graph), {copy_eager:.0f} GB/s (eager)", flush=True)
        rows.append({"shape": label, "M": M, "K": K, "format": "bf16 copy", "rounding": "-", "variant": "copy_",
                     "tile": "-", "num_warps": "-", "vec": "-", "programs_per_sm": "-", "median_ms": round(4 * M * K / copy_gbs / 1e6, 4),
                     "eager_ms": round(4 * M * K / copy_eager / 1e6, 4), "bytes": 4 * M * K, "bytes_moved": 4 * M * K,
                     "gbs": round(copy_gbs, 1), "copy_gbs": round(copy_gbs, 1), "pct_of_copy": 100.0,
                     "row_sqnr_db": "", "n_regs": "", "n_spills": ""})
        rows += bench_shape(label, M, K, copy_gbs, tune=(i == 0 and not args.no_tune), chosen=chosen, start=start,
                            sweep_rows=sweep_rows)
        triton_kernels.PREFETCH = None
        if i == 0 and not args.no_ablation:
            try:
                hw_checks, hw_rows = ablation_no_hw_cvt(label, M, K, copy_gbs, chosen)
                check_rows += hw_checks
                rows += hw_rows
            except Exception as exc:  # an ablation: never fatal
                print(f"  ablation (hardware cvt off) failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if args.out:   # after each shape, so a timeout still leaves numbers
            paths = [bench.write_csv(rows, "formats", f"quantize_{args.tag}", results_dir=args.out),
                     bench.write_csv(check_rows, "formats", f"quantize_check_{args.tag}", results_dir=args.out)]
            if sweep_rows:
                paths.append(bench.write_csv(sweep_rows, "formats", f"quantize_tiles_{args.tag}", results_dir=args.out))
    paths += [bench.write_csv(rows, "formats", f"quantize_{args.tag}"),
              bench.write_csv(check_rows, "formats", f"quantize_check_{args.tag}")]
    if sweep_rows:
        paths.append(bench.write_csv(sweep_rows, "formats", f"quantize_tiles_{args.tag}"))
    print("wrote", *paths)
    summary = [{k: r.get(k, "") for k in ("shape", "format", "rounding", "variant", "tile", "num_warps", "vec",
                                          "programs_per_sm", "prefetch", "median_ms", "gbs", "pct_of_copy", "n_regs")}
               for r in rows]
    print(f"\nGPU: {env['gpu']}   bit-exact: {all_ok}   total {time.time() - start:.0f}s")
    bench.print_table(summary)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""SageAttention2 (fewer's Triton kernels) against torch SDPA's flash and cuDNN backends, same run, same GPU.

    PYTHONPATH=. python benchmarks/attention/bench_sage.py            # full: checks, accuracy, speed
    PYTHONPATH=. python benchmarks/attention/bench_sage.py --quick    # fewer checks, the key shapes

1. GPU correctness: the Triton kernels against the PyTorch twin (same arithmetic) and an fp32/fp64
   reference, on awkward shapes (ragged lengths, GQA, [B, L, H, D], head dims 64/96/128, causal).
2. Accuracy table against fp64 on the hard cases, with the ablations (no K smoothing, single-level
   PV accumulation on the real tensor cores).
3. Speed: sage time INCLUDING the fused quantization (and the attention kernel alone), flash and
   cuDNN, TFLOP/s from 4*B*H*L*L*D (halved causal), ratios, and a quality column.
CSVs: benchmarks/results/<gpu>/attention_sage.csv (speed), attention_sage_accuracy.csv, attention_sage_checks.csv.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from fewer.attention import reference_attention
from fewer.attention.sage import SageConfig, sage_attention
from fewer.bench import attention_flops, environment, print_table, time_ms, write_csv

bench_time_ms = time_ms
from fewer.core import cos_sim, error_report, rel_l1


def _inputs(b, hq, hk, lq, lk, d, *, dtype=torch.bfloat16, v_bias=2.0, k_bias=0.0, qk_gain=1.0, seed=0,
            layout="bhld"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=g) * qk_gain
    k = torch.randn(b, hk, lk, d, device="cuda", generator=g) * qk_gain
    v = torch.randn(b, hk, lk, d, device="cuda", generator=g)
    if k_bias:
        k = k + k_bias * torch.randn(d, device="cuda", generator=g)
    if v_bias:
        v = v + v_bias * torch.randn(d, device="cuda", generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def gpu_checks(quick: bool = False, mini: bool = False) -> list[dict]:
    rows = []
    cases = [
        dict(b=2, hq=4, hk=4, lq=1000, lk=1000, d=128, causal=False),
        dict(b=2, hq=4, hk=4, lq=1000, lk=1000, d=128, causal=True),
        dict(b=1, hq=8, hk=2, lq=777, lk=1500, d=64, causal=False),
        dict(b=1, hq=8, hk=1, lq=1500, lk=777, d=64, causal=True),
        dict(b=1, hq=4, hk=4, lq=513, lk=513, d=96, causal=True),
        dict(b=1, hq=4, hk=4, lq=300, lk=300, d=40, causal=False),
        dict(b=1, hq=2, hk=2, lq=256, lk=256, d=256, causal=False),
        dict(b=2, hq=4, hk=2, lq=1000, lk=1000, d=128, causal=True, layout="blhd"),
        # 24 key chunks: the default statistics read 8 of them (stride 3), V factors per 128 keys, a ragged end
        dict(b=1, hq=4, hk=2, lq=700, lk=3001, d=128, causal=False),
        dict(b=1, hq=4, hk=4, lq=3001, lk=3001, d=64, causal=True),
    ]
    configs = ["sage2", "sage2_v_global", "sage2pp", "sage2_smooth_q", "sage_per_block", "sage_per_token",
               "sage2_pv16"]
    if quick:  # fewer compilations: the default, the v5 V scale, SA2++ (BN64, FP16 accumulator), per-token, FP16 PV
        cases = [cases[i] for i in (0, 1, 2, 3, 6, 7, 8, 9)]
        configs = ["sage2", "sage2_v_global", "sage2pp", "sage_per_token", "sage2_pv16"]
    if mini:   # a few seconds: the default and the v5 V scale on a sampled ragged shape and a causal one
        cases = [cases[8], cases[1]]
        configs = ["sage2", "sage2_v_global"]
    for case in cases:
        layout = case.get("layout", "bhld")
        q, k, v = _inputs(case["b"], case["hq"], case["hk"], case["lq"], case["lk"], case["d"], layout=layout)
        gqa = case["hq"] != case["hk"]
        qb, kb, vb = (t.transpose(1, 2) if layout == "blhd" else t for t in (q, k, v))
        ref, ref_lse = reference_attention(qb, kb, vb, is_causal=case["causal"], enable_gqa=gqa, return_lse=True)
        for name in configs:
            cfg = SageConfig.from_preset(name)
            try:
                out, lse = sage_attention(q, k, v, is_causal=case["causal"], enable_gqa=gqa, layout=layout,
                                      config=cfg, return_lse=True)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                rows.append(dict(case=str(case), config=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                print(rows[-1], flush=True)
                continue
            twin = sage_attention(q, k, v, is_causal=case["causal"], enable_gqa=gqa, layout=layout,
                                  config=cfg.replace(kernel="torch"))
            out_b = out.transpose(1, 2) if layout == "blhd" else out
            rows.append(dict(case=str(case), config=name, finite=bool(torch.isfinite(out).all()),
                             rel_l1_vs_twin=rel_l1(out, twin), rel_l1_vs_fp32=rel_l1(out_b, ref),
                             cos_vs_fp32=cos_sim(out_b, ref), twin_rel_l1_vs_fp32=rel_l1(
                                 twin.transpose(1, 2) if layout == "blhd" else twin, ref),
                             lse_max_abs_err=float((lse - ref_lse).abs().max())))
    return rows


def accuracy_table(long_len: int) -> list[dict]:
    """Hard cases vs fp64 (on a query slice for the long one), default config and ablations."""
    cases = {
        "random (V channel bias)": dict(),
        "zero-mean V": dict(v_bias=0.0),
        "K channel bias 10": dict(k_bias=10.0),
        "peaked (Q,K x3)": dict(qk_gain=3.0),
        "large V (x1000)": dict(v_scale=1000.0),
        "Q outlier channels": dict(q_outlier=20.0),
        f"{long_len // 1024}K tokens": dict(lk=long_len),
    }
    variants = {
        "sage2": SageConfig.from_preset("sage2"),
        "sage2_v_global (v5 default)": SageConfig.from_preset("sage2_v_global"),
        "sage2 smooth_q": SageConfig.from_preset("sage2_smooth_q"),
        "sage2pp": SageConfig.from_preset("sage2pp"),
        "sage2_pv16": SageConfig.from_preset("sage2_pv16"),
        "no K smoothing": SageConfig(smooth_k=False),
        "single-level PV": SageConfig(pv_accumulation="fp32"),
        "no V smoothing": SageConfig(smooth_v=False),
        "no V smoothing, single-level PV": SageConfig(smooth_v=False, pv_accumulation="fp32"),
    }
    rows = []
    for name, spec in cases.items():
        lk = spec.get("lk", 4096)
        q, k, v = _inputs(1, 8, 8, lk, lk, 128, v_bias=spec.get("v_bias", 2.0), k_bias=spec.get("k_bias", 0.0),
                          qk_gain=spec.get("qk_gain", 1.0), seed=1)
        if "v_scale" in spec:
            v = (v.float() * spec["v_scale"]).to(v.dtype)
        if "q_outlier" in spec:
            q = q.clone()
            q[..., :4] += spec["q_outlier"]
        rows_q = slice(0, 1024)  # fp64 reference on the first 1024 queries (all keys)
        ref = reference_attention(q[:, :, rows_q].double(), k.double(), v.double(), compute_dtype=torch.float64)
        bf16 = F.scaled_dot_product_attention(q, k, v)[:, :, rows_q]
        row = dict(case=name, lk=lk, sdpa_bf16_rel_l1=rel_l1(bf16, ref))
        for vname, cfg in variants.items():
            out = sage_attention(q, k, v, config=cfg)[:, :, rows_q]
            rep = error_report(out, ref)
            row[f"{vname}: cos"] = rep["cos_sim"]
            row[f"{vname}: rel_l1"] = rep["rel_l1"]
            if vname in ("sage2", "sage2_v_global (v5 default)", "sage2_pv16"):
                row[f"{vname}: rmse"] = rep["rmse"]
        rows.append(row)
    return rows


def speed_rows(quick: bool, rep: int = 100) -> list[dict]:
    from fewer.attention.sage.triton import attend_triton, q_in_kernel, quantize_triton

    shapes = []
    if quick:  # the bar: d128 and d64 at L >= 8K non-causal, one causal row
        for d, L, causal in ((128, 8192, False), (128, 16384, False), (128, 8192, True), (64, 8192, False),
                             (64, 16384, False)):
            shapes.append(dict(B=4, H=32, L=L, D=d, causal=causal))
    else:
        for d in (128, 64):
            for L in (1024, 2048, 4096, 8192, 16384):
                for causal in (False, True):
                    shapes.append(dict(B=4, H=32, L=L, D=d, causal=causal))
            for causal in (False, True):
                shapes.append(dict(B=2, H=32, L=32768, D=d, causal=causal))
    shapes.append(dict(B=1, H=12, L=32760, D=128, causal=False, name="wan2.1-1.3b"))
    cfg = SageConfig.from_preset("sage2")
    cfg16 = SageConfig.from_preset("sage2_pv16")
    cfg5 = SageConfig.from_preset("sage2_v_global")   # the v5 default: V scale and K/V means over all tokens
    rows = []

    def time_ms(fn):
        return bench_time_ms(fn, rep=rep)

    for shp in shapes:
        b, h, L, d, causal = shp["B"], shp["H"], shp["L"], shp["D"], shp["causal"]
        q, k, v = _inputs(b, h, h, L, L, d, seed=2)
        flops = attention_flops(b, h, L, L, d, causal)
        row = dict(shape=shp.get("name", ""), B=b, H=h, L=L, D=d, causal=causal)
        timings = {}
        timings["sage"] = time_ms(lambda: sage_attention(q, k, v, is_causal=causal, config=cfg))
        # with Q quantized inside the attention kernel (the default at d128), kernel-only includes Q's
        # quantization and quant-only is K and V
        sep = not q_in_kernel(cfg, d)
        buffers = quantize_triton(q, k, v, 1 / math.sqrt(d), cfg, quantize_q=sep)
        out = torch.empty_like(q)
        timings["sage_kernel_only"] = time_ms(lambda: attend_triton(buffers, out, L, L, is_causal=causal, config=cfg))
        timings["sage_quant_only"] = time_ms(lambda: quantize_triton(q, k, v, 1 / math.sqrt(d), cfg, quantize_q=sep))
        # the v5 default in the same run: sage_attention, its kernel alone and its quantization alone
        timings["sage_v5"] = time_ms(lambda: sage_attention(q, k, v, is_causal=causal, config=cfg5))
        buffers5 = quantize_triton(q, k, v, 1 / math.sqrt(d), cfg5, quantize_q=sep)
        timings["v5_kernel_only"] = time_ms(lambda: attend_triton(buffers5, out, L, L, is_causal=causal, config=cfg5))
        timings["v5_quant_only"] = time_ms(lambda: quantize_triton(q, k, v, 1 / math.sqrt(d), cfg5, quantize_q=sep))
        del buffers5
        # the two pipelines side by side (no custom-op overhead in either)
        for name, quant_q in (("pipeline_q_in_kernel", False), ("pipeline_q_separate", True)):
            timings[name] = time_ms(lambda quant_q=quant_q: attend_triton(
                quantize_triton(q, k, v, 1 / math.sqrt(d), cfg, quantize_q=quant_q), out, L, L,
                is_causal=causal, config=cfg))
        timings["sage_pv16"] = time_ms(lambda: sage_attention(q, k, v, is_causal=causal, config=cfg16))
        for name, backend in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                              ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with torch.nn.attention.sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            try:
                timings[name] = time_ms(run)
            except RuntimeError as exc:  # a backend refusing a shape is reported, not hidden
                print(f"{name} failed on {shp}: {exc}", file=sys.stderr)
        for name, t in timings.items():
            row[f"{name}_ms"] = t["median_ms"]
            if name not in ("sage_quant_only", "v5_quant_only", "pipeline_q_in_kernel", "pipeline_q_separate"):
                row[f"{name}_tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
        if "cudnn" in timings:
            row["sage_vs_cudnn"] = timings["cudnn"]["median_ms"] / timings["sage"]["median_ms"]
            row["sage_pv16_vs_cudnn"] = timings["cudnn"]["median_ms"] / timings["sage_pv16"]["median_ms"]
            row["sage_v5_vs_cudnn"] = timings["cudnn"]["median_ms"] / timings["sage_v5"]["median_ms"]
        if "flash" in timings:
            row["sage_vs_flash"] = timings["flash"]["median_ms"] / timings["sage"]["median_ms"]
            row["sage_pv16_vs_flash"] = timings["flash"]["median_ms"] / timings["sage_pv16"]["median_ms"]
        # quality on the first head's first 1024 queries, against fp32
        sl = (slice(0, 1), slice(0, 2), slice(0, 1024))
        out_full = sage_attention(q, k, v, is_causal=causal, config=cfg)
        ref = reference_attention(q[sl], k[:1, :2], v[:1, :2], is_causal=causal)
        row["cos_vs_fp32"] = cos_sim(out_full[sl], ref)
        row["rel_l1_vs_fp32"] = rel_l1(out_full[sl], ref)
        out16 = sage_attention(q, k, v, is_causal=causal, config=cfg16)
        row["pv16_rel_l1_vs_fp32"] = rel_l1(out16[sl], ref)
        rows.append(row)
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        del q, k, v, buffers, out, out_full, out16
        torch.cuda.empty_cache()
    return rows


QUANT_WARP_CHOICES = [dict(first_pass=4, kv=4), dict(first_pass=8, kv=8), dict(first_pass=4, kv=8)]


def quant_sweep(shapes=((4, 32, 8192, 128), (4, 32, 8192, 64), (1, 12, 32760, 128))) -> list[dict]:
    """Quantization alone (three launches) per warp setting, with its bytes and bandwidth, against a plain
    copy of Q, K and V (torch clone) timed in the same run."""
    from fewer.attention.sage.triton import quantize_triton

    cfg = SageConfig.from_preset("sage2")
    rows = []
    for b, h, L, d in shapes:
        q, k, v = _inputs(b, h, h, L, L, d, seed=5)
        elems = b * h * L * d
        # reads: Q once, K and V twice (statistics, then quantization); writes: INT8 Q and K, FP8 V (+ scales)
        moved = elems * (2 + 2 * 2 + 2 * 2) + elems * 3
        copy = time_ms(lambda: (q.clone(), k.clone(), v.clone()))
        base = dict(B=b, H=h, L=L, D=d, bytes_gb=moved / 1e9, copy_qkv_ms=copy["median_ms"],
                    copy_tb_s=elems * 2 * 3 * 2 / (copy["median_ms"] * 1e-3) / 1e12)
        for warps in QUANT_WARP_CHOICES:
            t = time_ms(lambda: quantize_triton(q, k, v, 1 / math.sqrt(d), cfg, warps=warps))
            rows.append(dict(base, warps=str(warps), quant_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                             tb_s=moved / (t["median_ms"] * 1e-3) / 1e12))
            print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in rows[-1].items()}, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# kernel variants of the sweep: (name, SageConfig overrides, attend_triton keyword arguments).
# "v3" is the previous default (per-token scale arithmetic, pointer loads, 3 stages, no register cap).
VARIANTS = {
    128: [
        ("v3 path: no group4, no TMA, s3", dict(), dict(group4=False, use_tma=False, num_stages=3)),
        ("group4, no TMA, s3", dict(), dict(use_tma=False, num_stages=3)),
        ("group4, no TMA, s2, 168 regs", dict(), dict(use_tma=False, num_stages=2, maxnreg=168)),
        ("group4, TMA, s3", dict(), dict(num_stages=3)),
        ("group4, TMA, s2", dict(), dict(num_stages=2)),
        ("group4, TMA, s2, 168 regs (default)", dict(), dict()),
        ("group4, TMA, s2, 168 regs, I2FP", dict(), dict(i2f=True)),
        ("group4, TMA, BN64, s2, 128 regs", dict(block_n=64), dict(num_stages=2, maxnreg=128)),
        ("group4, TMA, BN64, s3", dict(block_n=64), dict(num_stages=3)),
    ],
    64: [
        ("v3 path BN64: no group4, no TMA, s3", dict(block_n=64), dict(group4=False, use_tma=False, num_stages=3)),
        ("group4, TMA, BN64, s3", dict(block_n=64), dict(num_stages=3)),
        ("group4, TMA, BN64, s3, 128 regs", dict(block_n=64), dict(num_stages=3, maxnreg=128)),
        ("group4, TMA, BN128, s3 (default)", dict(), dict()),
        ("group4, TMA, BN128, s2", dict(), dict(num_stages=2)),
        ("group4, TMA, BN128, s3, 128 regs", dict(), dict(num_stages=3, maxnreg=128)),
    ],
}


def variant_sweep(shapes=((2, 32, 8192, 128), (1, 12, 32760, 128), (2, 32, 8192, 64))) -> list[dict]:
    """Kernel-only time of each variant in VARIANTS on the given (B, H, L, D) shapes, non-causal, and its
    rel-L1 against the PyTorch twin of the same config (L <= 8192)."""
    from fewer.attention.sage.triton import attend_triton, quantize_triton

    rows = []
    for b, h, L, d in shapes:
        q, k, v = _inputs(b, h, h, L, L, d, seed=3)
        flops = attention_flops(b, h, L, L, d)
        twins = {}   # the PyTorch twin per config (block_n sets where P~ is rounded, so it is part of the function)
        for name, cfg_kw, kw in VARIANTS[d]:
            cfg = SageConfig(**cfg_kw)
            buffers = quantize_triton(q, k, v, 1 / math.sqrt(d), cfg)
            out = torch.full_like(q, float("nan"))
            row = dict(B=b, H=h, L=L, D=d, variant=name)
            try:
                attend_triton(buffers, out, L, L, is_causal=False, config=cfg, **kw)
                if L <= 8192:
                    if cfg not in twins:
                        twins[cfg] = sage_attention(q, k, v, config=cfg.replace(kernel="torch"))
                    row["rel_l1_vs_twin"] = rel_l1(out, twins[cfg])
                row["finite"] = bool(torch.isfinite(out).all())
                t = time_ms(lambda: attend_triton(buffers, out, L, L, is_causal=False, config=cfg, **kw))
                row.update(ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                           tflops=flops / (t["median_ms"] * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is a result too
                row.update(ms=float("nan"), error=f"{type(exc).__name__}: {str(exc)[:160]}")
            rows.append(row)
            print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
            del buffers, out
        del q, k, v, twins
        torch.cuda.empty_cache()
    return rows


def profile_one() -> None:
    """One sage call at B2 H32 L8192 d128 after a warm-up, for `ncu -k regex:_attn_fwd_kernel`."""
    q, k, v = _inputs(2, 32, 32, 8192, 8192, 128, seed=4)
    for _ in range(2):
        sage_attention(q, k, v)
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile-one", action="store_true", help="one call for ncu, nothing else")
    parser.add_argument("--small-sweep", action="store_true", help="sweep only the old and the new default")
    parser.add_argument("--skip", nargs="*", default=(), choices=("checks", "accuracy", "speed", "sweep", "quant"))
    parser.add_argument("--tag", default="", help="suffix of the CSV names (e.g. _v5_run1)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms) of each speed timing")
    parser.add_argument("--mini-checks", action="store_true", help="only two check shapes, two configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_sage needs a CUDA GPU")
        return 1
    if args.profile_one:
        profile_one()
        return 0
    print(environment(), flush=True)
    t0 = time.time()
    # most wanted first (a call that runs out of time still leaves these): quantization, speed, accuracy, checks
    if "quant" not in args.skip:
        qs = quant_sweep()
        print("quant sweep written to", write_csv(qs, "attention", "sage_quant" + args.tag), flush=True)
    if "speed" not in args.skip:
        rows = speed_rows(args.quick, args.rep)
        path = write_csv(rows, "attention", "sage" + args.tag)
        print(f"\nspeed written to {path} ({time.time() - t0:.0f}s total)")
        keep = ("shape", "B", "H", "L", "D", "causal", "sage_ms", "sage_kernel_only_ms", "sage_quant_only_ms",
                "cudnn_ms", "flash_ms", "sage_vs_cudnn", "sage_vs_flash", "sage_v5_ms", "v5_kernel_only_ms",
                "v5_quant_only_ms", "sage_v5_vs_cudnn", "sage_pv16_vs_cudnn", "rel_l1_vs_fp32",
                "pipeline_q_in_kernel_ms", "pipeline_q_separate_ms")
        print_table([{c: r.get(c, "") for c in keep} for r in rows])
    if "accuracy" not in args.skip:
        acc = accuracy_table(8192 if args.quick else 32768)
        print_table(acc)
        print("accuracy written to", write_csv(acc, "attention", "sage_accuracy" + args.tag), flush=True)
    if "checks" not in args.skip:
        checks = gpu_checks(args.quick, args.mini_checks)
        print_table(checks)
        print("checks written to", write_csv(checks, "attention", "sage_checks" + args.tag), flush=True)
    if "sweep" not in args.skip:
        if args.small_sweep:  # the previous default against the new one on one shape (same card, same run)
            for d in VARIANTS:
                VARIANTS[d] = [v for v in VARIANTS[d] if v[0].startswith("v3") or v[0].endswith("(default)")]
            sweep = variant_sweep(shapes=((2, 32, 8192, 128), (2, 32, 8192, 64)))
        else:
            sweep = variant_sweep()
        print("sweep written to", write_csv(sweep, "attention", "sage_variants" + args.tag), flush=True)
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

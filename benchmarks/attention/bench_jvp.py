"""JVP attention on the GPU: correctness against float64, then speed and memory against the baselines.

    PYTHONPATH=. python3 benchmarks/attention/bench_jvp.py [--quick] [--out DIR]

Part 1 (correctness, larger shapes than the CPU tests): O and tO of the Triton kernel vs a float64
reference, next to the error of bf16 torch.func.jvp through math SDPA (the issue's bar: kernel error
<= 2x that), random and peaked inputs, cross-attention, causal; gradients through (O, tO) vs float64
double autograd.

Part 2 (speed), all in one run on one card, per shape:
  jvp_kernel        fewer's fused Triton JVP (O and tO)
  jvp_kernel_classic_rescale   the same kernel rescaling every block (no lazy max): the v2 ablation
  kernel_fwd_only   the same kernel without tangents (O only): how much the tangent costs
  func_jvp_math     torch.func.jvp through SDPA's math backend (only where it fits; else n/a)
  chunked_exact     the exact JVP formula in PyTorch, fp32, 2048-query chunks (linear memory)
  flash_fwd, cudnn_fwd   forward-only SDPA (no tangent): the lower bound
TFLOP/s counts 3x the forward FLOPs (6 matmuls) for JVP methods and 1x for forward-only ones.
Quality: rel_l2 of O and tO vs the chunked fp32 reference on the same inputs (kept in fp32).
CSVs: benchmarks/results/<gpu>/attention_jvp.csv (speed), attention_jvp_accuracy.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from fewer import bench
from fewer.attention.jvp import attention, jvp_attention, jvp_attention_exact
from fewer.attention.jvp import reference as ref
from fewer.core import rel_l2

# (name, B, H, L, D, causal)
SPEED_SHAPES = [
    ("sweep-d128", 1, 16, 4096, 128, False),
    ("sweep-d128", 1, 16, 8192, 128, False),
    ("sweep-d128", 1, 16, 16384, 128, False),
    ("sweep-d128", 1, 16, 32768, 128, False),
    ("sweep-d64", 1, 16, 4096, 64, False),
    ("sweep-d64", 1, 16, 8192, 64, False),
    ("sweep-d64", 1, 16, 16384, 64, False),
    ("causal-d128", 1, 16, 8192, 128, True),
    ("wan2.1-1.3b", 1, 12, 32760, 128, False),
]
QUICK_SHAPES = [("sweep-d128", 1, 16, 4096, 128, False), ("sweep-d128", 1, 16, 8192, 128, False)]
MATH_BYTES_PER_SCORE = 24      # measured ~19 B per score element for bf16 func.jvp on math SDPA (pilot); margin


def _inputs(b, h, lq, lk, d, dtype, device, peaked=False, dv=None):
    dv = dv or d
    shapes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, dv), (b, h, lq, d), (b, h, lk, d), (b, h, lk, dv)]
    ts = [torch.randn(s, device=device, dtype=torch.float32) for s in shapes]
    if peaked:  # large logits: near one-hot softmax rows
        ts[0] = ts[0] * 6.0
    return [t.to(dtype) for t in ts]


_math_jvp = ref.stock_math_jvp


def correctness(device, rows_out):
    print("== correctness (vs float64) ==", flush=True)
    cases = [  # (label, B, H, Lq, Lk, D, causal, dtype, peaked)
        ("self", 2, 4, 1000, 1000, 64, False, torch.bfloat16, False),
        ("self-causal", 2, 4, 1000, 1000, 128, True, torch.bfloat16, False),
        ("cross", 1, 8, 1023, 517, 128, False, torch.bfloat16, False),
        ("cross-causal", 1, 8, 517, 1023, 64, True, torch.float16, False),
        ("peaked", 1, 8, 2048, 2048, 128, False, torch.bfloat16, True),
        ("peaked-causal", 1, 8, 999, 999, 64, True, torch.float16, True),
        ("head-dim-72", 1, 4, 777, 777, 72, False, torch.bfloat16, False),
        ("self-4k", 1, 8, 4096, 4096, 128, False, torch.bfloat16, False),
    ]
    ok = True
    for label, b, h, lq, lk, d, causal, dtype, peaked in cases:
        q, k, v, tq, tk, tv = _inputs(b, h, lq, lk, d, dtype, device, peaked)
        o64, to64 = jvp_attention_exact(*(t.double() for t in (q, k, v, tq, tk, tv)), causal, None,
                                        compute_dtype=torch.float64, chunk_size=512)
        o, to = jvp_attention(q, k, v, tq, tk, tv, is_causal=causal, backend="triton")
        om, tom = _math_jvp(q, k, v, tq, tk, tv, causal)
        row = dict(case=label, B=b, H=h, Lq=lq, Lk=lk, D=d, causal=causal, dtype=str(dtype).split(".")[-1],
                   err_o_kernel=rel_l2(o, o64), err_to_kernel=rel_l2(to, to64),
                   err_o_math=rel_l2(om, o64), err_to_math=rel_l2(tom, to64))
        row["ratio_o"] = row["err_o_kernel"] / max(row["err_o_math"], 1e-12)
        row["ratio_to"] = row["err_to_kernel"] / max(row["err_to_math"], 1e-12)
        finite = bool(torch.isfinite(o).all() and torch.isfinite(to).all())
        row["pass"] = finite and row["ratio_o"] <= 2.0 and row["ratio_to"] <= 2.0
        ok &= row["pass"]
        rows_out.append(row)
        print({k_: (f"{v_:.3e}" if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        del q, k, v, tq, tk, tv, o64, to64, o, to, om, tom
    # Gradients through (O, tO): fp32 kernel path vs float64 double autograd through the reference.
    for causal in (False, True):
        ins = [t.requires_grad_() for t in _inputs(1, 4, 513, 771, 64, torch.float32, device)]
        o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, is_causal=causal, backend="triton"),
                               tuple(ins[:3]), tuple(ins[3:]))
        go, gto = torch.randn_like(o), torch.randn_like(to)
        grads = torch.autograd.grad((o, to), ins, (go, gto))
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        o64, to64 = torch.func.jvp(lambda q, k, v: ref.attention_reference(q, k, v, causal, None,
                                                                           compute_dtype=torch.float64),
                                   tuple(ins64[:3]), tuple(ins64[3:]))
        grads64 = torch.autograd.grad((o64, to64), ins64, (go.double(), gto.double()))
        errs = [rel_l2(g, g64) for g, g64 in zip(grads, grads64)]
        passed = max(errs) < 1e-3    # tf32-free fp32 kernel + fp32 backward
        ok &= passed
        row = dict(case=f"grad-through-tangent{'-causal' if causal else ''}", B=1, H=4, Lq=513, Lk=771, D=64,
                   causal=causal, dtype="float32", err_grad_max=max(errs), **{"pass": passed})
        rows_out.append(row)
        print(row, flush=True)
    return ok


def _time(fn, slow=False):
    return bench.time_ms(fn, warmup=5 if slow else 25, rep=20 if slow else 100)["median_ms"]


def speed(device, shapes, rows_out):
    print("== speed ==", flush=True)
    free_bytes = torch.cuda.mem_get_info()[0]
    for name, b, h, L, d, causal in shapes:
        q, k, v, tq, tk, tv = _inputs(b, h, L, L, d, torch.bfloat16, device)
        fwd_flops = bench.attention_flops(b, h, L, L, d, causal)
        # float32 reference on the same (bf16-valued) inputs, left in float32 so that it carries no
        # output rounding (run 1 rounded it to bf16; see NOTES_jvp.md)
        o_ref, to_ref = jvp_attention_exact(*(t.float() for t in (q, k, v, tq, tk, tv)), causal, None,
                                            compute_dtype=torch.float32, chunk_size=2048)
        base = dict(shape=name, B=b, H=h, L=L, D=d, causal=causal, dtype="bfloat16")

        def record(method, fn, flops_mult, slow=False, outputs=None):
            row = dict(base, method=method)
            try:
                torch.cuda.empty_cache()
                result = fn()
                if outputs == "jvp":
                    row["rel_l2_o"], row["rel_l2_to"] = rel_l2(result[0], o_ref), rel_l2(result[1], to_ref)
                elif outputs == "o":
                    row["rel_l2_o"] = rel_l2(result, o_ref)
                del result
                ms = _time(fn, slow)
                row["ms"] = ms
                row["tflops"] = bench.tflops(flops_mult * fwd_flops, ms)
                row["peak_mb"] = bench.peak_memory_mb(fn)
            except torch.cuda.OutOfMemoryError:
                row["ms"], row["note"] = float("nan"), "OOM"
            except Exception as exc:  # record and go on: one failing baseline must not lose the run
                row["ms"], row["note"] = float("nan"), f"{type(exc).__name__}: {exc}"[:120]
            torch.cuda.empty_cache()
            rows_out.append(row)
            print({k_: (f"{v_:.4g}" if isinstance(v_, float) else v_) for k_, v_ in row.items()
                   if k_ not in base or k_ == "L"}, flush=True)
            return row

        kern = record("jvp_kernel", lambda: jvp_attention(q, k, v, tq, tk, tv, is_causal=causal, backend="triton"),
                      3, outputs="jvp")
        if d == 128 and not causal and L <= 16384:
            from fewer.attention.jvp import triton as kernels
            s = 1.0 / d ** 0.5
            record("jvp_kernel_classic_rescale",
                   lambda: kernels.jvp_attention_forward(q, k, v, tq, tk, tv, causal, s,
                                                         rescale_slack=kernels.ALWAYS_RESCALE)[:2],
                   3, outputs="jvp")
        record("kernel_fwd_only", lambda: attention(q, k, v, is_causal=causal, backend="triton"), 1, outputs="o")
        if MATH_BYTES_PER_SCORE * b * h * L * L < 0.85 * free_bytes:
            math_row = record("func_jvp_math", lambda: _math_jvp(q, k, v, tq, tk, tv, causal), 3, slow=True,
                              outputs="jvp")
        else:
            math_row = dict(base, method="func_jvp_math", ms=float("nan"),
                            note=f"skipped: needs ~{MATH_BYTES_PER_SCORE * b * h * L * L / 2**30:.0f} GiB")
            rows_out.append(math_row)
            print(math_row, flush=True)
        record("chunked_exact", lambda: jvp_attention_exact(q, k, v, tq, tk, tv, causal, None,
                                                            compute_dtype=torch.float32, chunk_size=2048),
               3, slow=True, outputs="jvp")

        def forced(backend):
            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return run
        flash = record("flash_fwd", forced(SDPBackend.FLASH_ATTENTION), 1, outputs="o")
        cudnn = record("cudnn_fwd", forced(SDPBackend.CUDNN_ATTENTION), 1, outputs="o")
        for row in (kern,):
            row["x_vs_func_jvp_math"] = math_row.get("ms", float("nan")) / row["ms"]
            row["x_of_flash_fwd"] = row["ms"] / flash.get("ms", float("nan"))
            row["x_of_cudnn_fwd"] = row["ms"] / cudnn.get("ms", float("nan"))
        del q, k, v, tq, tk, tv, o_ref, to_ref
        torch.cuda.empty_cache()


def kernel_report():
    """Registers, spills and shared memory of each compiled variant, and the tuned configs."""
    lines = []
    try:
        from fewer.attention.jvp import triton as kernels
        tuner = kernels._autotuned_kernel()
        for key, cfg in getattr(tuner, "cache", {}).items():
            lines.append(f"tuned {key}: {cfg}")
        for dev_cache in kernels._jvp_attention_fwd_kernel.device_caches.values():
            for compiled in dev_cache[0].values():
                compiled._init_handles()     # loads the binary; fills n_regs / n_spills
                md = compiled.metadata
                ptx = compiled.asm.get("ptx", "")
                waits = sorted(set(ln.strip() for ln in ptx.splitlines() if "wgmma.wait_group" in ln))
                lines.append(f"compiled: regs={compiled.n_regs} spills={compiled.n_spills} shared={md.shared} "
                             f"warps={md.num_warps} stages={md.num_stages} "
                             f"wgmma={ptx.count('wgmma.mma_async')} waits={waits}")
    except Exception as exc:  # reporting only
        lines.append(f"kernel report unavailable: {type(exc).__name__}: {exc}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--out", default=None, help="also copy the CSVs here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_jvp needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    env = bench.environment()
    print(env, flush=True)
    start = time.time()
    acc_rows, speed_rows = [], []
    ok = True
    if not args.skip_correctness:
        try:
            ok = correctness(device, acc_rows)
        except Exception:
            traceback.print_exc()
            ok = False
        path = bench.write_csv(acc_rows, "attention", "jvp_accuracy")
        print("wrote", path, f"({time.time() - start:.0f}s)", flush=True)
    shapes = QUICK_SHAPES if args.quick else SPEED_SHAPES
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only.split(",")]
    speed(device, shapes, speed_rows)
    path = bench.write_csv(speed_rows, "attention", "jvp")
    print("wrote", path, f"({time.time() - start:.0f}s)", flush=True)
    for line in kernel_report():
        print(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        import shutil
        for p in (path, path.with_name("attention_jvp_accuracy.csv")):
            if p.exists():
                shutil.copy(p, args.out)
    print("\n== summary ==")
    print(f"correctness: {'PASS' if ok else 'FAIL'}")
    summary = [dict(shape=r["shape"], L=r["L"], D=r["D"], causal=r["causal"], method=r["method"],
                    ms=r.get("ms", float("nan")), tflops=r.get("tflops", float("nan")),
                    peak_mb=r.get("peak_mb", float("nan")), err_to=r.get("rel_l2_to", float("nan")),
                    x_math=r.get("x_vs_func_jvp_math", ""), x_cudnn=r.get("x_of_cudnn_fwd", ""),
                    note=r.get("note", "")) for r in speed_rows]
    bench.print_table(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

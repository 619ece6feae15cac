"""Tour: JVP attention (forward-mode derivative of attention in one fused pass)."""

from __future__ import annotations

import torch

ORDER = 40
TITLE = "JVP attention: forward-mode derivatives of attention"


def _inputs(shape_q, shape_k, dtype, device, peaked, gen):
    ts = [torch.randn(s, generator=gen).to(device) for s in (shape_q, shape_k, shape_k, shape_q, shape_k, shape_k)]
    if peaked:
        ts[0] = ts[0] * 6.0
    return [t.to(dtype) for t in ts]


def _math_jvp(q, k, v, tq, tk, tv, causal):
    from ...attention.jvp.reference import stock_math_jvp
    return stock_math_jvp(q, k, v, tq, tk, tv, causal)


def run(ctx) -> None:
    from ...attention.jvp import jvp_attention
    from ...attention.jvp import reference as ref
    from ...core import rel_l2

    ctx.add("rCM/sCM distillation needs the JVP of the whole network; torch.func.jvp cannot go through "
            "SDPA's flash kernel and through math attention it is slow and quadratic in memory. "
            "`fewer.attention.jvp` computes O and its tangent tO in one online-softmax pass (Triton on "
            "CUDA, PyTorch elsewhere), and registers the `jvp` backend so any fewer model supports "
            "torch.func.jvp, forward_ad and backward through the tangent.\n")
    gen = torch.Generator().manual_seed(ctx.seed)
    device = ctx.device
    L = 1024 if ctx.on_gpu else 192
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for peaked in (False, True):
            for causal in (False, True):
                ins = _inputs((1, 4, L, 64), (1, 4, L + 37, 64), dtype, device, peaked, gen)
                o64, to64 = ref.jvp_attention_exact(*(t.double() for t in ins), causal, None,
                                                    compute_dtype=torch.float64)
                if ctx.on_gpu:
                    o, to = jvp_attention(*ins, is_causal=causal, backend="triton")
                    name = "Triton kernel"
                else:  # the kernel's PyTorch twin: the same arithmetic, without the interpreter's slowness
                    o, to, _ = ref.jvp_attention_blockwise(*ins, causal, None)
                    name = "kernel twin (PyTorch)"
                om, tom = _math_jvp(*ins, causal)
                rows.append({"dtype": str(dtype).split(".")[-1], "inputs": "peaked" if peaked else "random",
                             "causal": causal, f"{name}: O": rel_l2(o, o64), f"{name}: tO": rel_l2(to, to64),
                             "math SDPA jvp: O": rel_l2(om, o64), "math SDPA jvp: tO": rel_l2(tom, to64)})
    ctx.add_table(rows, f"Relative L2 error vs float64 (B1 H4 Lq{L} Lk{L + 37} d64); the issue's bar is "
                        "kernel error <= 2x math attention's")
    ctx.results["jvp_attention_accuracy"] = rows

    if ctx.on_gpu:
        from ... import bench
        b, h, L, d = 1, 16, 8192, 128
        ins = _inputs((b, h, L, d), (b, h, L, d), torch.bfloat16, device, False, gen)
        kernel_ms = bench.time_ms(lambda: jvp_attention(*ins, backend="triton"))["median_ms"]
        try:
            math_ms = bench.time_ms(lambda: _math_jvp(*ins, False), warmup=5, rep=20)["median_ms"]
        except torch.cuda.OutOfMemoryError:
            math_ms = float("nan")
        flops = 3 * bench.attention_flops(b, h, L, L, d)
        speed = [{"method": "fewer JVP kernel", "ms": kernel_ms, "TFLOP/s": bench.tflops(flops, kernel_ms)},
                 {"method": "torch.func.jvp, math SDPA", "ms": math_ms, "TFLOP/s": bench.tflops(flops, math_ms)}]
        ctx.add_table(speed, f"Speed, B{b} H{h} L{L} d{d} bf16, {bench.environment()['gpu']} "
                             f"(speed-up {math_ms / kernel_ms:.1f}x)")
        ctx.results["jvp_attention_speed"] = speed
    else:
        ctx.add("Speed is measured on a GPU (`benchmarks/attention/bench_jvp.py`); on an H100 the kernel "
                "took 3.3 ms at B1 H16 L8192 d128 bf16 against 80.5 ms for torch.func.jvp through math "
                "attention (24x), see benchmarks/results/nvidia-h100-80gb-hbm3/attention_jvp.csv.\n")

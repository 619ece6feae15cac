"""Tour: SageAttention2 (INT8 QK, FP8 PV) accuracy against fp64, with its ablations; on a GPU also speed."""

from __future__ import annotations

import torch

ORDER = 30
TITLE = "Quantized attention: SageAttention2 (INT8 QK^T, FP8 PV)"


def _inputs(case: dict, heads: int, lq: int, lk: int, d: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, d, generator=g) * case.get("qk_gain", 1.0)
    k = torch.randn(1, heads, lk, d, generator=g) * case.get("qk_gain", 1.0)
    v = torch.randn(1, heads, lk, d, generator=g)
    k = k + case.get("k_bias", 0.0) * torch.randn(d, generator=g)
    v = (v + case.get("v_bias", 2.0) * torch.randn(d, generator=g)) * case.get("v_gain", 1.0)
    if case.get("q_outlier"):
        q[..., :4] += case["q_outlier"]
    return tuple(t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v))


def run(ctx) -> None:
    from fewer.attention import reference_attention
    from fewer.attention.sage import SageConfig, sage_attention
    from fewer.core import cos_sim, rel_l1

    ctx.add("INT8 Q/K with per-thread scales and K smoothing, FP8 E4M3 P~ (static scale 448) and V (per-channel "
            "scale, channel mean removed), two-level PV accumulation. Errors against fp64 attention; "
            "`random` has a per-channel bias on V, as real V activations do; `zero-mean V` shows the floor "
            "that E4M3's 3 mantissa bits set. " + ("Triton kernels." if ctx.on_gpu else
                                                   "CPU: the PyTorch twin of the kernels."))
    heads, length, d = (8, 4096, 128) if ctx.on_gpu else (2, 256, 64)
    cases = {
        "random": {}, "zero-mean V": {"v_bias": 0.0}, "K channel bias 10": {"k_bias": 10.0},
        "peaked (QK x3)": {"qk_gain": 3.0}, "large V (x1000)": {"v_gain": 1000.0},
        "Q outlier channels": {"q_outlier": 20.0},
    }
    kernel = "auto" if ctx.on_gpu else "torch"
    variants = {
        "sage2": SageConfig(kernel=kernel),
        "no K smoothing": SageConfig(kernel=kernel, smooth_k=False),
        "Q smoothing": SageConfig(kernel=kernel, smooth_q=True),
        "no V smoothing, single-level PV": SageConfig(kernel=kernel, smooth_v=False, pv_accumulation="fp32"),
        "no V smoothing, two-level PV": SageConfig(kernel=kernel, smooth_v=False),
    }
    rows = []
    for name, case in cases.items():
        q, k, v = _inputs(case, heads, length, length, d, ctx.device, ctx.seed)
        ref = reference_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
        bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        row = {"case": name, "bf16 SDPA rel_l1": rel_l1(bf16, ref)}
        for vname, cfg in variants.items():
            out = sage_attention(q, k, v, config=cfg)
            if vname == "sage2":
                row["sage2 cos"] = cos_sim(out, ref)
            row[f"{vname} rel_l1"] = rel_l1(out, ref)
        rows.append(row)
    ctx.add_table(rows, f"Accuracy vs fp64 (B1 H{heads} L{length} d{d}, bf16 inputs)")
    ctx.results["sage_attention_accuracy"] = rows
    ctx.add("Single-level PV on CPU is the twin's emulation of Hopper's truncating FP8-MMA accumulator; "
            "the GPU benchmark measures the real one (benchmarks/attention/NOTES_sage.md).")

    if ctx.on_gpu:
        from fewer.bench import attention_flops, time_ms
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = _inputs({}, 16, 8192, 8192, 128, ctx.device, ctx.seed)
        q, k, v = (torch.cat([t, t.roll(1, dims=2)]) for t in (q, k, v))   # B2 H16
        flops = attention_flops(2, 16, 8192, 8192, 128)
        speed = []
        for name, fn in (("sage (incl. quantization)", lambda: sage_attention(q, k, v)),):
            speed.append({"method": name, "ms": time_ms(fn)["median_ms"]})
        for name, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
            def call(backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            speed.append({"method": name, "ms": time_ms(call)["median_ms"]})
        for row in speed:
            row["TFLOP/s"] = flops / (row["ms"] * 1e-3) / 1e12
            row["speedup vs cuDNN"] = speed[1]["ms"] / row["ms"] if len(speed) > 1 else float("nan")
        ctx.add_table(speed, "Speed, B2 H16 L8192 d128, non-causal")
        ctx.results["sage_attention_speed"] = speed

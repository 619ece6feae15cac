"""SDPA backends at LLaMA and Wan2.1 shapes: the baselines every fewer attention kernel is measured against.

    PYTHONPATH=. python benchmarks/attention/bench_sdpa.py [--shapes llama-7b-attn wan2.1-1.3b] [--quick]

For each shape and causal mode: median time, TFLOP/s (4*B*H*L*L*D, halved when causal) and a quality
column (rel_l2 against an fp32 reference on the first batch-head slice) for torch's flash, cuDNN,
memory-efficient and math backends. A backend that cannot run gives a row with n/a and the reason.
Writes benchmarks/results/<gpu>/attention_sdpa.csv.
Profile one case with: ncu --set full -k regex:flash python benchmarks/attention/bench_sdpa.py --quick
"""

from __future__ import annotations

import argparse

import torch

from fewer import bench
from fewer.attention import reference_attention, sdpa
from fewer.core import rel_l2

BACKENDS = ("flash", "cudnn", "efficient", "math")
MATH_MAX_L = 8192  # the math backend materialises B*H*L*L scores; skip it above this length


def run_one(shape: dict[str, int], causal: bool, backend: str, dtype: torch.dtype, device: str) -> dict:
    b, h, l, d = shape["B"], shape["H"], shape["L"], shape["D"]
    row = {"backend": backend, "B": b, "H": h, "L": l, "D": d, "causal": causal, "dtype": str(dtype).split(".")[-1]}
    if backend == "math" and l > MATH_MAX_L:
        return {**row, "median_ms": "n/a", "note": f"math backend skipped above L={MATH_MAX_L} (L x L scores)"}
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, l, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    try:
        out = sdpa(q, k, v, is_causal=causal, backend=backend)
        t = bench.time_ms(lambda: sdpa(q, k, v, is_causal=causal, backend=backend))
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # a backend that cannot run is a row, not a crash
        return {**row, "median_ms": "n/a", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    ref = reference_attention(q[:1, :1].float(), k[:1, :1].float(), v[:1, :1].float(), is_causal=causal)
    flops = bench.attention_flops(b, h, l, l, d, causal)
    return {**row, **{k_: round(v_, 4) for k_, v_ in t.items()},
            "tflops": round(bench.tflops(flops, t["median_ms"]), 1),
            "rel_l2_vs_fp32": float(f"{rel_l2(out[:1, :1].float(), ref):.3e}"), "note": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["llama-7b-attn", "attn-sweep-d64", "wan2.1-1.3b"])
    parser.add_argument("--quick", action="store_true", help="one small shape per set (smoke test)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name in args.shapes:
        shapes = bench.SHAPES[name]
        if args.quick or device == "cpu":
            shapes = [dict(shapes[0], L=min(shapes[0]["L"], 512 if device == "cpu" else 4096))]
        for shape in shapes:
            for causal in (False, True):
                for backend in BACKENDS:
                    row = run_one(shape, causal, backend, dtype, device)
                    rows.append({"shape_set": name, **row})
                    print(row, flush=True)
    path = bench.write_csv(rows, "attention", "sdpa")
    bench.print_table([{k: r.get(k, "") for k in ("shape_set", "backend", "L", "D", "causal", "median_ms", "tflops",
                                                  "rel_l2_vs_fp32")} for r in rows])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

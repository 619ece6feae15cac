"""The benchmark harness every ``benchmarks/<area>/bench_<op>.py`` script uses.

- ``environment()``: GPU name, SM, torch/triton/CUDA versions, git commit and date, stamped on every row;
- ``time_ms(fn)``: median and p20/p80 in milliseconds (``triton.testing.do_bench`` on CUDA, which times with
  events after warm-up and flushes L2 between runs; a wall clock on CPU);
- ``peak_memory_mb(fn)``: peak CUDA memory of one call above what was allocated before it;
- FLOP formulas (``attention_flops``, ``matmul_flops``) so that TFLOP/s comes from an explicit count;
- ``SHAPES``: named shape sets, real model shapes included;
- ``write_csv(rows, area, name)``: ``benchmarks/results/<gpu-slug>/<area>_<name>.csv``;
  ``write_rows(path, rows)``: the same CSV layout (columns in first-seen order) at any path;
- ``print_table(rows)``.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Named shape sets. Attention shapes are (B, H, L, D); matmul shapes are (M, K, N).
SHAPES: dict[str, list[dict[str, int]]] = {
    "wan2.1-1.3b": [dict(B=1, H=12, L=32760, D=128)],           # Wan2.1-1.3B video DiT self-attention
    "wan2.1-14b": [dict(B=1, H=40, L=75600, D=128)],
    "llama-7b-attn": [dict(B=2, H=32, L=L, D=128) for L in (1024, 2048, 4096, 8192)],
    "llama3-8b-attn": [dict(B=1, H=32, L=L, D=128) for L in (8192, 16384, 32768)],
    "attn-sweep-d64": [dict(B=2, H=16, L=L, D=64) for L in (1024, 4096, 8192, 16384)],
    "llama-7b-mlp": [dict(M=8192, K=4096, N=11008), dict(M=8192, K=11008, N=4096)],
    "llm-quant": [dict(M=8192, K=8192), dict(M=16384, K=4096)],
}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu, sm = torch.cuda.get_device_name(), f"{major}.{minor}"
    else:
        gpu, sm = f"cpu ({platform.processor() or platform.machine()})", "-"
    return {"gpu": gpu, "sm": sm, "torch": torch.__version__, "triton": triton_version,
            "cuda": str(torch.version.cuda), "commit": os.environ.get("FEWER_COMMIT", _git_commit()),
            "date": datetime.date.today().isoformat()}


def gpu_slug(name: str | None = None) -> str:
    name = name or environment()["gpu"]
    if name.startswith("cpu"):  # one folder for CPU results, whatever the processor
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> dict[str, float]:
    """Median and p20/p80 of ``fn()`` in ms. ``warmup``/``rep`` are milliseconds on CUDA (do_bench's
    meaning) and call counts on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return {"median_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80)}
    for _ in range(max(1, warmup // 10)):
        fn()
    times = []
    for _ in range(max(3, rep // 10)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory during one ``fn()`` above the memory allocated before it (MB); nan on CPU."""
    if not torch.cuda.is_available():
        return float("nan")
    gc.collect()  # a tensor left from an earlier call, freed during fn(), would hide fn's own memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool = False) -> float:
    """Forward FLOPs of attention: two matmuls of 2*lq*lk*d each per head (FlashAttention's count);
    causal halves it. Backward is conventionally 2.5x the forward."""
    flops = 4.0 * b * h * lq * lk * d
    return flops / 2 if causal else flops


def matmul_flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(numel: int = 1 << 28, dtype: torch.dtype = torch.bfloat16) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(numel, device="cuda", dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))["median_ms"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def write_csv(rows: Sequence[dict[str, Any]], area: str, name: str, results_dir: Path | None = None) -> Path:
    """Write rows (each stamped with ``environment()``) to results/<gpu-slug>/<area>_<name>.csv."""
    env = environment()
    base = Path(results_dir or os.environ.get("FEWER_RESULTS_DIR") or REPO_ROOT / "benchmarks" / "results")
    folder = base / gpu_slug(env["gpu"])
    folder.mkdir(parents=True, exist_ok=True)
    return write_rows(folder / f"{area}_{name}.csv", rows, extra=env)


def write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None,
               float_format: str | None = None) -> Path:
    """Rows whose keys may differ to one CSV at ``path``: columns in first-seen order, then the keys of
    ``extra`` (values every row gets unless it has its own); floats through ``float_format`` if given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns += [c for c in extra if c not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format(v, float_format) if float_format and isinstance(v, float) else v
                             for k, v in {**extra, **row}.items()})
    return path


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("(no rows)")
        return
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(fmt(row.get(c, "")).ljust(widths[c]) for c in columns))

"""Time one training step (forward + backward + AdamW) of fewer's LLaMA under each quantized-training arm.

The baseline is the same model with plain nn.Linear under bf16 autocast (the ``bf16`` arm), timed in the
same process on the same card. Every other preset of ``fewer.fqt`` is timed with ``backend="triton"``
(the fused quantizers of ``fewer.formats``) and, for reference, ``backend="torch"`` (the PyTorch twin).
For each (shape, arm, backend): median step time in ms (``fewer.bench.time_ms``: do_bench on CUDA),
ratio to bf16, tokens/s and peak memory above the model + optimizer state. OutControl arms are timed
after a channel selection (the MXFP8/NVFP4 split path, which is what they run for ~95 % of training).
``oscireset_window_ms`` is the extra cost of one OsciReset tracking step (inside a 50-step window, i.e.
50 of every 200 steps after 60 % of training), timed separately.

Then a per-piece breakdown of ``tetrajet_v2`` (triton) and of ``bf16`` from torch.profiler: every op's
self device time is charged to the nearest enclosing label the benchmark puts around fewer.fqt's
pieces (by wrapping the module's functions at run time, not by editing them):

- ``quantize``: ``fewer.fqt.linear.quantize_operand`` (quantize + dequantize of one operand);
- ``hadamard``: the RHT16 and its inverse;
- ``gemm``: matmul / mm / addmm / bmm not inside the two above (the three GEMMs of each layer, the LM head);
- ``attention``: scaled-dot-product attention kernels;
- ``optimizer``: AdamW's step;
- ``glue``: everything else (norms, RoPE, SwiGLU, casts, padding, the loss, the fp32 copies);
- ``idle (launch gaps)`` (GPU): the unprofiled median step time minus the kernel time above, i.e. the
  GPU waiting on Python and launches. ``share`` is each piece over their sum.

On CUDA a piece's time is the duration of the kernels its ops launched (from the profiled steps); on the
CPU (``--tiny``: a 1-block model, the torch backend, the breakdown of tetrajet_v2 only) it is the ops' self CPU
time.

    PYTHONPATH=. python3 benchmarks/fqt/bench_step.py --out $OUT                  # GPU, every shape
    PYTHONPATH=. python3 benchmarks/fqt/bench_step.py --shapes sweep --arms bf16 tetrajet_v2
    python benchmarks/fqt/bench_step.py --tiny                                    # CPU, seconds

CSVs: ``benchmarks/results/<gpu>/fqt_step.csv`` (timings), ``fqt_step_breakdown.csv`` (pieces),
``fqt_step_ops.csv`` (the top ops by self device time), under ``--results-dir`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fewer import bench  # noqa: E402
from fewer.fqt import PRESETS, convert_for_training, get_recipe  # noqa: E402
from fewer.fqt import linear as fqt_linear  # noqa: E402
from fewer.models.llama import Llama, LlamaConfig  # noqa: E402

VOCAB = 8192          # the english corpus' BPE
# name -> (model config, batch, seq). Every linear dim a multiple of 128 (TetraJet-v2's 1x128 outer blocks).
SHAPES = {
    # the sweep's default model (fewer.fqt.recipe_run RUN_PRESETS["gpu"]): d 384, 6 layers, hidden 1024
    "sweep": (dict(dim=384, n_layers=6, n_heads=6, ffn_hidden=1024, max_seq_len=1024), 64, 1024),
    "d512": (dict(dim=512, n_layers=8, n_heads=8, ffn_hidden=1408, max_seq_len=1024), 64, 1024),
    "d1024": (dict(dim=1024, n_layers=8, n_heads=16, ffn_hidden=2816, max_seq_len=2048), 16, 2048),
}
TINY_SHAPE = (dict(dim=128, n_layers=1, n_heads=4, ffn_hidden=256, max_seq_len=64), 2, 64)
TINY_VOCAB = 512
LABELS = ("quantize", "hadamard")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_scaled_mm", "aten::baddbmm")
ATTENTION_MARKERS = ("attention", "flash", "sdpa", "efficient_attention", "cudnn_attention")


def build(shape, arm: str, backend: str, device: str, vocab: int):
    cfg, batch, seq = shape
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=vocab, tie_embeddings=False, **cfg)).to(device)
    report = None
    if arm != "bf16":
        report = convert_for_training(model, get_recipe(arm, backend=backend))
        if report.recipe.outcontrol.enabled:
            select_outcontrol(report)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        with torch.profiler.record_function("fqt::optimizer"):
            opt.step()
        return loss

    return model, report, step


def select_outcontrol(report) -> None:
    """Select OutControl channels now (from random channel norms), so the split path is what is timed."""
    from fewer.fqt.outcontrol import OutControl

    gen = torch.Generator(device="cpu").manual_seed(2)
    for layer in report.converted.values():
        layer.channel_norm_sum.copy_(torch.rand(layer.in_features, generator=gen).to(layer.channel_norm_sum.device))
    OutControl(report.converted, report.recipe.outcontrol).select(step=0)


def oscireset_window_ms(report, device: str) -> float:
    """One OsciReset tracking step (re-quantize every weight, accumulate |dQ| and |dw|), in ms."""
    from fewer.fqt.oscireset import OsciReset
    from fewer.fqt.recipe import OsciResetConfig

    osc = OsciReset(report.converted, OsciResetConfig(enabled=True, start_step=1, window=1, period=2))
    osc._snapshot(0)
    return bench.time_ms(osc._accumulate, warmup=10, rep=50)["median_ms"]


@contextlib.contextmanager
def labelled_pieces():
    """Wrap fewer.fqt.linear's quantizer and Hadamard functions in record_function labels (restored after)."""
    names = {"quantize_operand": "fqt::quantize", "_rht": "fqt::hadamard",
             "inverse_random_hadamard_transform": "fqt::hadamard"}
    saved = {n: getattr(fqt_linear, n) for n in names}

    def wrap(fn, label):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return inner

    try:
        for name, label in names.items():
            setattr(fqt_linear, name, wrap(saved[name], label))
        yield
    finally:
        for name, fn in saved.items():
            setattr(fqt_linear, name, fn)


def _self_time(evt, device: bool) -> float:
    """A key_averages row's self time (us): device time on CUDA, CPU time on the CPU."""
    if device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.0
    return float(evt.self_cpu_time_total)


def _own_time(evt, device: bool) -> float:
    """The time (us) of what a CPU op did itself: on CUDA the kernels it launched directly (children launch
    their own; device-side events are skipped so nothing counts twice), on the CPU its self CPU time."""
    from torch.autograd import DeviceType

    if getattr(evt, "device_type", DeviceType.CPU) != DeviceType.CPU:
        return 0.0
    if device:
        return float(sum(k.duration for k in getattr(evt, "kernels", ())))
    return float(evt.self_cpu_time_total)


def categorize(evt) -> str:
    """The piece an op's self time belongs to: the nearest fqt:: label above it, else by the op's name."""
    node = evt
    while node is not None:
        if node.name.startswith("fqt::"):
            return node.name[len("fqt::"):]
        node = node.cpu_parent
    name = evt.name.lower()
    if evt.name in GEMM_OPS:
        return "gemm"
    if any(m in name for m in ATTENTION_MARKERS):
        return "attention"
    return "glue"


def breakdown(step, steps: int, device: str, warm: bool = True) -> tuple[dict[str, float], list[dict]]:
    """ms per step for each piece, and the top ops by self time, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_gpu = device == "cuda"
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled_pieces():
        if warm:
            step()                                          # warm (compiles, allocator)
        if on_gpu:
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if on_gpu:
                torch.cuda.synchronize()
    pieces = {k: 0.0 for k in ("quantize", "hadamard", "gemm", "attention", "optimizer", "glue")}
    for evt in prof.events():
        t = _own_time(evt, on_gpu)
        if t:
            piece = categorize(evt)
            pieces[piece] = pieces.get(piece, 0.0) + t / 1e3 / steps
    ops = []
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    averages = sorted(averages, key=lambda e: -_self_time(e, on_gpu))
    for evt in averages[:25]:
        ops.append({"op": evt.key[:120], "self_ms_per_step": round(_self_time(evt, on_gpu) / 1e3 / steps, 4),
                    "calls_per_step": evt.count / steps, "time": key})
    return pieces, ops


def run(args) -> tuple[list[dict], list[dict], list[dict]]:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke mode")
    shapes = {"tiny": TINY_SHAPE} if args.tiny else {k: SHAPES[k] for k in args.shapes}
    vocab = TINY_VOCAB if args.tiny else VOCAB
    arms = args.arms or list(PRESETS)
    backends = args.backends or (["torch"] if args.tiny else ["triton", "torch"])
    began = time.perf_counter()
    rows, pieces_rows, op_rows = [], [], []
    warmup, rep = (10, 30) if args.tiny else (args.warmup_ms, args.rep_ms)      # CPU: calls x 10
    breakdown_backend = "torch" if args.tiny else args.breakdown_backend
    profile_steps = 1 if args.tiny else args.profile_steps
    # order: every shape's bf16 baseline, then the first backend (triton) over every shape, then the reference;
    # a deadline then cuts the least needed timings
    jobs = [(name, "bf16", "-") for name in shapes]
    jobs += [(name, arm, b) for b in backends for name in shapes for arm in arms if arm != "bf16"]
    base: dict[str, float] = {}
    for shape_name, arm, backend in jobs:
        shape = shapes[shape_name]
        cfg, batch, seq = shape
        base_ms = base.get(shape_name)
        if time.perf_counter() - began > args.deadline_s:
            print(f"deadline reached: skipping {shape_name} {arm} {backend}", flush=True)
            continue
        row = {"shape": shape_name, "arm": arm, "backend": backend, "dim": cfg["dim"],
               "n_layers": cfg["n_layers"], "ffn_hidden": cfg["ffn_hidden"], "batch": batch, "seq": seq,
               "tokens_per_step": batch * seq}
        try:
            model, report, step = build(shape, arm, "torch" if backend == "-" else backend, device, vocab)
            row["params"] = sum(p.numel() for p in model.parameters())
            row["quantized_layers"] = len(report.converted) if report else 0
            if device == "cuda":
                step()                                   # compile + warm
                torch.cuda.synchronize()
            t = bench.time_ms(step, warmup=warmup, rep=rep)
            row.update({k: round(v, 4) for k, v in t.items()})
            row["peak_mem_mb"] = round(bench.peak_memory_mb(step), 1)
            if device == "cuda":
                row["peak_total_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if arm == "bf16":
                base_ms = base[shape_name] = t["median_ms"]
            row["ratio_to_bf16"] = round(t["median_ms"] / base_ms, 4) if base_ms else float("nan")
            row["tokens_per_s"] = round(batch * seq / (t["median_ms"] / 1e3))
            if report is not None and report.recipe.oscireset.enabled:
                row["oscireset_window_ms"] = round(oscireset_window_ms(report, device), 4)
            if ((arm == "tetrajet_v2" or (arm == "bf16" and not args.tiny)) and backend in ("-", breakdown_backend)
                    and not args.no_breakdown):
                pieces, ops = breakdown(step, profile_steps, device, warm=not args.tiny)
                if device == "cuda":        # the GPU waiting for launches: the median step minus kernel time
                    pieces["idle (launch gaps)"] = max(0.0, row["median_ms"] - sum(pieces.values()))
                total = sum(pieces.values())
                for piece, ms in pieces.items():
                    pieces_rows.append({"shape": shape_name, "arm": arm, "backend": backend, "piece": piece,
                                        "ms_per_step": round(ms, 4),
                                        "share": round(ms / total, 4) if total else float("nan"),
                                        "step_median_ms": row["median_ms"]})
                for op in ops:
                    op_rows.append({"shape": shape_name, "arm": arm, "backend": backend, **op})
            row["error"] = ""
        except Exception as exc:                      # one arm failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        print(" ".join(f"{k}={row[k]}" for k in ("shape", "arm", "backend", "median_ms", "ratio_to_bf16",
                                                  "peak_mem_mb", "error") if k in row), flush=True)
        rows.append(row)
        model = report = step = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, pieces_rows, op_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: a 1-block dim-128 model, torch backend")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--arms", nargs="+", default=None, help=f"presets (default all: {', '.join(PRESETS)})")
    parser.add_argument("--backends", nargs="+", default=None, choices=("triton", "torch"))
    parser.add_argument("--breakdown-backend", default="triton", help="backend of the tetrajet_v2 breakdown")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--warmup-ms", type=int, default=200)
    parser.add_argument("--rep-ms", type=int, default=1000)
    parser.add_argument("--deadline-s", type=float, default=float(os.environ.get("FEWER_BENCH_DEADLINE_S", "480")),
                        help="skip the remaining arms after this many seconds (the CSV keeps what was timed)")
    parser.add_argument("--results-dir", default="", help="write <dir>/<gpu>/fqt_step*.csv instead of "
                                                          "benchmarks/results")
    parser.add_argument("--out", default="", help="also copy the CSVs here (e.g. $OUT)")
    parser.add_argument("--name", default="step", help="CSV name: fqt_<name>.csv")
    args = parser.parse_args(argv)
    for arm in args.arms or []:
        get_recipe(arm)
    if args.tiny:
        torch.set_num_threads(1)
    rows, pieces, ops = run(args)
    results = args.results_dir or None
    from pathlib import Path
    paths = [bench.write_csv(rows, "fqt", args.name, Path(results) if results else None)]
    if pieces:
        paths.append(bench.write_csv(pieces, "fqt", f"{args.name}_breakdown", Path(results) if results else None))
    if ops:
        paths.append(bench.write_csv(ops, "fqt", f"{args.name}_ops", Path(results) if results else None))
    if args.out:
        import shutil
        os.makedirs(args.out, exist_ok=True)
        for p in paths:
            shutil.copy(p, os.path.join(args.out, p.name))
    print()
    bench.print_table([{k: r.get(k, "") for k in ("shape", "arm", "backend", "median_ms", "ratio_to_bf16",
                                                  "tokens_per_s", "peak_mem_mb", "oscireset_window_ms")}
                       for r in rows])
    if pieces:
        print()
        bench.print_table(pieces)
    for p in paths:
        print("wrote", p)
    return rows, pieces, ops


if __name__ == "__main__":
    main()

"""Sparse-Linear Attention on the GPU: correctness at moderate shapes, then speed vs SDPA flash/cuDNN.

    PYTHONPATH=. python3 benchmarks/attention/bench_sla.py [--quick] [--out DIR]

Every SLA time includes all overheads: block scoring (pooling + scores + top-k), the feature map,
the totals H_tot/Z_tot, the fused kernel, the projection (and for fwd+bwd the whole backward).
A breakdown at 95% sparsity (plan only, kernel only, kernel without the linear part) shows what
limits the kernel. Writes benchmarks/results/<gpu>/attention_sla.csv (and _check, _breakdown).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from fewer import bench
from fewer.attention.sla import SLAConfig, SparseLinearAttention, plan_blocks, sla_parts
from fewer.attention.sla.ops import MODE_NONE, linear_mode_for, sla_forward_op
from fewer.attention.sla.reference import apply_feature_map, combine, sla_parts_reference
from fewer.core import rel_l2

SHAPES = [  # (name, B, H, L, D); the headline shape first, so a timeout keeps it
    ("wan2.1-1.3b", 1, 12, 32760, 128),
    ("L8K", 1, 12, 8192, 128),
    ("L16K", 1, 12, 16384, 128),
    ("wan2.1-14b", 1, 40, 75600, 128),
]
SPARSITIES = (0.80, 0.90, 0.95, 0.97)


def _sdpa(kernel):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, kernel)

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _fwd_bwd(fn, q, k, v, grad):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)
    return run


CHECK_CASES = [  # (B, H, Lq, Lk, D, config): every linear mode, ragged lengths, Lq != Lk, d=72
    (1, 4, 2000, 2000, 128, SLAConfig(topk=0.1, negligible=0.1)),
    (2, 2, 1023, 1537, 64, SLAConfig(topk=0.2, negligible=0.0)),
    (1, 2, 777, 1111, 72, SLAConfig(topk=0.1, negligible=0.7, feature_map="elu", block_q=128)),
    (1, 4, 2048, 2048, 128, SLAConfig.from_preset("official-main")),
]


def check_correctness(rows: list, cases=CHECK_CASES, dev: str = "cuda") -> None:
    """bf16 kernel vs an fp32 reference (from the same bf16 inputs), next to the error of the same
    reference computed in bf16 ('bf16 PyTorch'); forward and gradients, with a non-zero proj."""
    torch.manual_seed(0)
    for (b, h, lq, lk, d, cfg) in cases:
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for n in (lq, lk, lk))
        attn = SparseLinearAttention(d, cfg.replace(backend="triton")).to(dev)
        torch.nn.init.normal_(attn.proj.weight, std=0.2)
        torch.nn.init.normal_(attn.proj.bias, std=0.1)
        grad = torch.randn(b, h, lq, d, device=dev, dtype=torch.bfloat16)

        def run(module, dtype_in):
            qq, kk, vv = (t.detach().to(dtype_in).requires_grad_() for t in (q, k, v))
            out = module(qq, kk, vv)
            out.backward(grad.to(dtype_in))
            return [out.float()] + [t.grad.float() for t in (qq, kk, vv)]

        got = run(attn, torch.bfloat16)
        plan = attn.last_plan
        ref_cfg = cfg.replace(backend="reference")

        def reference(compute_dtype):
            qq, kk, vv = (t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v))
            o_s, o_l = sla_parts_reference(qq, kk, vv, ref_cfg, plan=plan, compute_dtype=compute_dtype)
            out = o_s.float() + F.linear(o_l.float(), attn.proj.weight.detach(), attn.proj.bias.detach())
            out.backward(grad.float())
            return [out] + [t.grad.float() for t in (qq, kk, vv)]

        exact = reference(torch.float32)
        bf16 = reference(torch.bfloat16)
        for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, exact, bf16):
            err, base = rel_l2(g, e), rel_l2(r, e)
            rows.append(dict(shape=f"B{b} H{h} Lq{lq} Lk{lk} d{d}", variant=_variant(cfg), tensor=name,
                             kernel_rel_l2=err, bf16_torch_rel_l2=base, ratio=err / max(base, 1e-12),
                             nan=bool(torch.isnan(g).any())))


def _variant(cfg: SLAConfig) -> str:
    return (f"{cfg.linear_scope},kl={cfg.negligible},phi={cfg.feature_map},"
            f"{cfg.block_q}x{cfg.block_k}{',smoothK' if cfg.smooth_k else ''}")


def bench_speed(rows: list, breakdown: list, shapes, sparsities, with_backward: bool) -> None:
    for name, b, h, L, d in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        flops = bench.attention_flops(b, h, L, L, d)
        base = {}
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            fn = _sdpa(backend)
            with torch.no_grad():
                t_f = bench.time_ms(lambda: fn(q, k, v))["median_ms"]
            t_fb = bench.time_ms(_fwd_bwd(fn, q, k, v, grad))["median_ms"] if with_backward else float("nan")
            base[backend] = (t_f, t_fb)
            rows.append(dict(shape=name, B=b, H=h, L=L, D=d, method=backend.split("_")[0].lower(), sparsity=0.0,
                             density=1.0, fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=bench.tflops(flops, t_f),
                             speedup_fwd_vs_cudnn="", speedup_fwd_vs_flash="", speedup_fwdbwd_vs_cudnn="",
                             rel_l2_vs_dense=0.0))
        with torch.no_grad():
            dense = _sdpa("CUDNN_ATTENTION")(q, k, v).float()
        for sparsity in sparsities:
            for preset in ("paper", "official-sla1"):
                cfg = SLAConfig.from_preset(preset, topk=round(1 - sparsity, 4), backend="triton")
                attn = SparseLinearAttention(d, cfg).cuda()
                with torch.no_grad():
                    t_f = bench.time_ms(lambda: attn(q, k, v))["median_ms"]
                    out = attn(q, k, v).float()
                    dens = attn.last_density()
                t_fb = bench.time_ms(_fwd_bwd(attn, q, k, v, grad))["median_ms"] if with_backward else float("nan")
                fl, cu = base["FLASH_ATTENTION"], base["CUDNN_ATTENTION"]
                rows.append(dict(shape=name, B=b, H=h, L=L, D=d, method=f"sla[{preset}]", sparsity=sparsity,
                                 density=dens, fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=bench.tflops(flops * dens, t_f),
                                 speedup_fwd_vs_cudnn=cu[0] / t_f, speedup_fwd_vs_flash=fl[0] / t_f,
                                 speedup_fwdbwd_vs_cudnn=cu[1] / t_fb if with_backward else float("nan"),
                                 rel_l2_vs_dense=rel_l2(out, dense)))
                del attn, out
                if sparsity == 0.95:
                    breakdown.extend(_breakdown(name, q, k, v, cfg, preset))
        del q, k, v, grad, dense
        torch.cuda.empty_cache()
        bench.write_csv(rows, "attention", "sla")  # after every shape, so a timeout keeps what ran
        bench.write_csv(breakdown, "attention", "sla_breakdown")


def tune(rows: list) -> None:
    """Sweep (num_warps, num_stages) of both kernels at the Wan2.1-1.3B shape, 95% (SLA-1 variant),
    and keep the fastest for the rest of the run (the choice is recorded in the CSV)."""
    from fewer.attention.sla import triton as kernels
    torch.manual_seed(0)
    b, h, L, d = 1, 12, 32760, 128
    q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    cfg = SLAConfig.from_preset("official-sla1", topk=0.05, backend="triton")
    attn = SparseLinearAttention(d, cfg).cuda()
    for which in ("fwd", "bwd"):
        best = None
        for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
            kernels.TUNING[(which, 64)] = (warps, stages)
            try:
                if which == "fwd":
                    with torch.no_grad():
                        ms = bench.time_ms(lambda: attn(q, k, v))["median_ms"]
                else:
                    ms = bench.time_ms(_fwd_bwd(attn, q, k, v, grad))["median_ms"]
            except Exception as exc:  # e.g. out of shared memory for a deep pipeline
                print(f"tuning {which} {warps}w{stages}s failed: {exc}")
                continue
            rows.append(dict(kernel=which, num_warps=warps, num_stages=stages, module_ms=ms,
                             measured=("fwd" if which == "fwd" else "fwd+bwd")))
            if best is None or ms < best[0]:
                best = (ms, warps, stages)
        kernels.TUNING[(which, 64)] = best[1:]
        print(f"tuning: {which} uses num_warps={best[1]}, num_stages={best[2]} ({best[0]:.3f} ms)")
    del q, k, v, grad
    torch.cuda.empty_cache()


def _breakdown(name, q, k, v, cfg, preset):
    """Where the forward time goes: plan (scoring + top-k), kernel with / without the linear part."""
    b, h, L, d = q.shape
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        t_plan = bench.time_ms(lambda: plan_blocks(q, k, cfg, scale))["median_ms"]
        plan = plan_blocks(q, k, cfg, scale)
        t_parts = bench.time_ms(lambda: sla_parts(q, k, v, cfg, scale, plan))["median_ms"]
        mode = linear_mode_for(plan, cfg)
        qc, kc, vc = (t.reshape(b * h, L, d).contiguous() for t in (q, k, v))
        qphi = apply_feature_map(qc, cfg.feature_map)
        kphi = apply_feature_map(kc, cfg.feature_map)
        htot = kphi.float().transpose(-2, -1) @ vc.float()
        ztot = kphi.float().sum(-2)
        lut_c = plan.critical.reshape(b * h, plan.critical.shape[2], -1)
        lut_l = plan.negligible.reshape(b * h, plan.critical.shape[2], -1)
        t_kernel = bench.time_ms(lambda: sla_forward_op(qc, kc, vc, qphi, kphi, htot, ztot, lut_c, lut_l, mode,
                                                        scale, cfg.linear_eps, cfg.block_q, cfg.block_k))["median_ms"]
        t_sparse = bench.time_ms(lambda: sla_forward_op(qc, kc, vc, qphi, kphi, htot, ztot, lut_c, lut_l[..., :0],
                                                        MODE_NONE, scale, cfg.linear_eps, cfg.block_q,
                                                        cfg.block_k))["median_ms"]
        t_phi = bench.time_ms(lambda: (apply_feature_map(qc, cfg.feature_map),
                                       apply_feature_map(kc, cfg.feature_map)))["median_ms"]
        o_s, o_l, _ = sla_parts(q, k, v, cfg, scale, plan)
        proj = torch.nn.Linear(d, d).to(q.device)
        t_combine = bench.time_ms(lambda: combine(o_s, o_l, proj.weight, proj.bias, q.dtype))["median_ms"]
    n_c, n_n = plan.num_critical, plan.num_negligible
    flops_sparse = 4.0 * b * h * L * d * n_c * cfg.block_k
    return [dict(shape=name, variant=preset, sparsity=0.95, n_critical=n_c, n_negligible=n_n, linear_mode=mode,
                 plan_ms=t_plan, feature_map_ms=t_phi, combine_ms=t_combine, fused_kernel_ms=t_kernel, sparse_only_kernel_ms=t_sparse,
                 parts_total_ms=t_parts, sparse_kernel_tflops=bench.tflops(flops_sparse, t_sparse))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the Wan2.1-1.3B shape at 95%% only")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sla needs a CUDA GPU", file=sys.stderr)
        return 1
    env = bench.environment()
    print(env)
    check_rows: list = []
    if not args.skip_check:
        check_correctness(check_rows)
        bench.print_table(check_rows)
        print("csv:", bench.write_csv(check_rows, "attention", "sla_check"))
    tuning: list = []
    tune(tuning)
    bench.print_table(tuning)
    print("csv:", bench.write_csv(tuning, "attention", "sla_tuning"))
    rows: list = []
    breakdown: list = []
    shapes = [s for s in SHAPES if s[0] == "wan2.1-1.3b"] if args.quick else SHAPES
    sparsities = (0.95,) if args.quick else SPARSITIES
    bench_speed(rows, breakdown, shapes, sparsities, not args.no_backward)
    print("csv:", bench.write_csv(rows, "attention", "sla"))
    print("csv:", bench.write_csv(breakdown, "attention", "sla_breakdown"))
    bench.print_table(breakdown)
    cols = ("shape", "method", "sparsity", "density", "fwd_ms", "fwd_bwd_ms", "speedup_fwd_vs_cudnn",
            "speedup_fwd_vs_flash", "speedup_fwdbwd_vs_cudnn", "rel_l2_vs_dense")
    bench.print_table([{c: r[c] for c in cols} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sparse-Linear Attention on the GPU: correctness at moderate shapes, then speed vs SDPA flash/cuDNN.

    PYTHONPATH=. python3 benchmarks/attention/bench_sla.py [--quick] [--shapes wan2.1-1.3b,L8K] [--no-backward]
    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
        -k regex:_sla_ --launch-count 4 python3 benchmarks/attention/bench_sla.py --ncu-forward

Every SLA time includes all overheads: block scoring (pooling + scores + top-k), the feature map,
the totals H_tot/Z_tot, the kernels, the projection (and for fwd+bwd the whole backward); the
forward is the inference call (no grad). A breakdown at 95% sparsity times each piece alone, a
torch.profiler table gives each kernel's GPU time in one module forward, and every compiled kernel's
registers / spills / shared memory are recorded. Writes benchmarks/results/<gpu>/attention_sla.csv
(and _check, _tuning, _breakdown, _profile, _kernels); NOTES_sla.md beside this file reads them.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from fewer import bench
from fewer.attention.sla import SLAConfig, SparseLinearAttention, plan_blocks
from fewer.attention.sla.ops import (MODE_NONE, PHI_CODES, _kernel_inputs, linear_mode_for, linear_totals,
                                     plan_blocks_kernel, sla_forward_op)
from fewer.attention.sla.reference import apply_feature_map, sla_parts_reference
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
        with torch.no_grad():  # the inference call: phi(Q) in the kernel, no parts saved
            got.append(attn(q, k, v).float())
        exact.append(exact[0])
        bf16.append(bf16[0])
        for name, g, e, r in zip(("out", "dq", "dk", "dv", "out_no_grad"), got, exact, bf16):
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
                torch.nn.init.normal_(attn.proj.weight, std=0.05)  # a trained-like proj, not zeros
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
    """Sweep the forward's structure (one fused kernel, or sparse kernel + linear-part kernel) and
    (num_warps, num_stages) at the Wan2.1-1.3B shape, 95% (SLA-1 variant), module forward without
    grad; keep the fastest for the rest of the run (recorded in the CSV). The backward keeps 8w2s."""
    from fewer.attention.sla import triton as kernels
    torch.manual_seed(0)
    b, h, L, d = 1, 12, 32760, 128
    q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = SLAConfig.from_preset("official-sla1", topk=0.05, backend="triton")
    attn = SparseLinearAttention(d, cfg).cuda()
    torch.nn.init.normal_(attn.proj.weight, std=0.05)

    def run(split, fwd, lin):
        """fwd, lin: (num_warps, num_stages, key blocks per step); lin None: fused forward."""
        kernels.SPLIT_FORWARD[64] = split
        kernels.TUNING[("fwd", 64)] = fwd[:2]
        kernels.PAIR_BLOCKS["fwd"] = fwd[2]
        if lin is not None:
            kernels.TUNING[("lin", 64)] = lin[:2]
            kernels.PAIR_BLOCKS["lin"] = lin[2]
        try:
            with torch.no_grad():
                ms = bench.time_ms(lambda: attn(q, k, v))["median_ms"]
        except Exception as exc:  # e.g. out of shared memory
            print(f"tuning split={split} fwd={fwd} lin={lin} failed: {exc}")
            return float("inf")
        fwd_used = kernels.TUNING[("fwd", 64)] + (kernels.PAIR_BLOCKS["fwd"],)  # after any stage fallback
        lin_used = kernels.TUNING[("lin", 64)] + (kernels.PAIR_BLOCKS["lin"],) if lin is not None else None
        rows.append(dict(split=split, fwd_warps_stages_pair=str(fwd_used), lin_warps_stages_pair=str(lin_used),
                         module_fwd_ms=ms))
        return ms

    # coordinate search over the split forward (the fused one and two key blocks per step lost in the
    # v3 sweep, NOTES_sla.md): the softmax kernel, then the linear kernel, then the totals pass
    results = []
    lin0 = (4, 3, 1)
    for fwd in ((4, 3, 1), (4, 2, 1)):
        results.append((run(True, fwd, lin0), True, fwd, lin0))
    best_fwd = min(results)[2]
    for lin in ((4, 2, 1), (8, 2, 1), (4, 3, 2)):
        results.append((run(True, best_fwd, lin), True, best_fwd, lin))
    ms, split, fwd, lin = min(results, key=lambda r: r[0])
    kernels.TUNING[("fwd", 64)], kernels.PAIR_BLOCKS["fwd"] = fwd[:2], fwd[2]
    kernels.TUNING[("lin", 64)], kernels.PAIR_BLOCKS["lin"] = lin[:2], lin[2]
    best_tot = None
    for tot in ((8, 2), (8, 3), (4, 3)):
        kernels.TUNING[("tot", 64)] = tot
        kphi = torch.softmax(k.reshape(b * h, L, d), -1)
        t_tot = bench.time_ms(lambda: kernels.sla_totals(kphi, v.reshape(b * h, L, d)))["median_ms"]
        rows.append(dict(split="totals pass", fwd_warps_stages_pair=str(tot), lin_warps_stages_pair="",
                         module_fwd_ms=t_tot))
        if best_tot is None or t_tot < best_tot[0]:
            best_tot = (t_tot, tot)
    kernels.TUNING[("tot", 64)] = best_tot[1]
    ms = run(split, fwd, lin)
    # inference-call options (NOTES_sla.md v3/v4): (PRELOAD_TOTALS, FOLD_PROJ, PHI_IN_KERNEL,
    # PHI_POOL_PASS); v3 was (False, False, True, False)
    names = ("PRELOAD_TOTALS", "FOLD_PROJ", "PHI_IN_KERNEL", "PHI_POOL_PASS")
    best_opt = (float("inf"), None)
    for opt in ((True, True, False, True), (True, True, False, False), (True, True, True, True),
                (False, False, True, True), (False, False, True, False), (True, False, True, True),
                (False, True, False, True)):
        for name, value in zip(names, opt):
            setattr(kernels, name, value)
        try:
            with torch.no_grad():
                t_opt = bench.time_ms(lambda: attn(q, k, v))["median_ms"]
        except Exception as exc:
            print(f"tuning options {opt} failed: {exc}")
            continue
        rows.append(dict(split="options preload,fold,phi_in_kernel,phi_pool", fwd_warps_stages_pair=str(opt),
                         lin_warps_stages_pair="", module_fwd_ms=t_opt))
        if t_opt < best_opt[0]:
            best_opt = (t_opt, opt)
    for name, value in zip(names, best_opt[1]):
        setattr(kernels, name, value)
    print(f"tuning: split={split} fwd={fwd} lin={lin} totals={best_tot[1]} ({ms:.3f} ms); "
          f"options (preload, fold, phi_in_kernel, phi_pool)={best_opt[1]} ({best_opt[0]:.3f} ms)")
    del q, k, v
    torch.cuda.empty_cache()


def kernel_resources() -> list:
    """Registers, spills and shared memory of every compiled SLA kernel variant (Triton's report)."""
    from fewer.attention.sla import triton as kernels
    rows = []
    for fn in (kernels._sla_fwd_kernel, kernels._sla_fwd_linear_kernel, kernels._sla_totals_kernel,
               kernels._sla_plan_kernel, kernels._sla_bwd_kernel):
        try:
            for cache in fn.device_caches.values():
                for key, kern in cache[0].items():
                    meta = kern.metadata
                    consts = {k: v for k, v in getattr(meta, "constants", {}).items()
                              if isinstance(k, str) and k.isupper()} if hasattr(meta, "constants") else {}
                    rows.append(dict(kernel=fn.__name__, n_regs=kern.n_regs, n_spills=kern.n_spills,
                                     shared_bytes=meta.shared, num_warps=meta.num_warps,
                                     num_stages=meta.num_stages, key=str(consts or key)[:160]))
        except Exception as exc:
            rows.append(dict(kernel=fn.__name__, n_regs=-1, n_spills=-1, shared_bytes=-1, num_warps=-1,
                             num_stages=-1, key=f"unavailable: {exc}"[:160]))
    return rows


def profile_forward(name: str, q, k, v, cfg) -> list:
    """Per-kernel GPU time of one module forward (torch.profiler, 5 calls averaged)."""
    from torch.profiler import ProfilerActivity, profile
    d = q.shape[-1]
    attn = SparseLinearAttention(d, cfg).cuda()
    torch.nn.init.normal_(attn.proj.weight, std=0.05)
    with torch.no_grad():
        for _ in range(3):
            attn(q, k, v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                attn(q, k, v)
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if dev_us <= 0:
            continue
        rows.append(dict(shape=name, preset=cfg.linear_scope + f",kl={cfg.negligible}", kernel=evt.key[:90],
                         calls_per_forward=evt.count / 5, ms_per_forward=dev_us / 5 / 1000))
    rows.sort(key=lambda r: -r["ms_per_forward"])
    return rows


def _breakdown(name, q, k, v, cfg, preset):
    """Where the forward time goes: each piece of the inference forward timed alone."""
    from fewer.attention.sla import triton as kernels
    b, h, L, d = q.shape
    scale = 1 / math.sqrt(d)
    split = kernels.SPLIT_FORWARD.get(cfg.block_q, False)
    with torch.no_grad():
        t_plan_torch = bench.time_ms(lambda: plan_blocks(q, k, cfg, scale))["median_ms"]
        t_plan = bench.time_ms(lambda: plan_blocks_kernel(q, k, cfg, scale))["median_ms"]
        plan = plan_blocks_kernel(q, k, cfg, scale)
        mode = linear_mode_for(plan, cfg)
        qc, kc, vc, qphi, kphi, htot, ztot, lut_c, lut_l = _kernel_inputs(q, k, v, cfg, plan, mode)
        t_phi_k = bench.time_ms(lambda: apply_feature_map(kc, cfg.feature_map))["median_ms"]
        t_totals = bench.time_ms(lambda: linear_totals(kphi, vc))["median_ms"]
        wpt = torch.randn(d, d, device=q.device) * 0.05
        bp = torch.zeros(d, device=q.device)
        dummy = torch.zeros(1, device=q.device, dtype=q.dtype)
        phi_q = PHI_CODES[cfg.feature_map]

        def kernels_call(mode_, split_, lut_l_):
            return sla_forward_op(qc, kc, vc, dummy, kphi, htot, ztot, lut_c, lut_l_, wpt, bp, mode_, scale,
                                  cfg.linear_eps, cfg.block_q, cfg.block_k, True, False, split_, phi_q)
        t_kernels = bench.time_ms(lambda: kernels_call(mode, split, lut_l))["median_ms"]
        t_fused = bench.time_ms(lambda: kernels_call(mode, False, lut_l))["median_ms"]
        t_split = bench.time_ms(lambda: kernels_call(mode, True, lut_l))["median_ms"]
        t_sparse = bench.time_ms(lambda: kernels_call(MODE_NONE, False, lut_l[..., :0]))["median_ms"]
        attn = SparseLinearAttention(d, cfg).to(q.device)
        torch.nn.init.normal_(attn.proj.weight, std=0.05)
        t_module = bench.time_ms(lambda: attn(q, k, v))["median_ms"]
    n_c, n_n = plan.num_critical, plan.num_negligible
    flops_sparse = 4.0 * b * h * L * d * n_c * cfg.block_k
    n_lin = n_c + n_n if mode == 1 else plan.num_marginal
    flops_linear = 4.0 * b * h * L * d * n_lin * cfg.block_k
    return [dict(shape=name, variant=preset, sparsity=round(1 - cfg.topk, 4), n_critical=n_c, n_negligible=n_n,
                 linear_mode=mode, split=split, plan_torch_topk_ms=t_plan_torch, plan_ms=t_plan, phi_k_ms=t_phi_k,
                 totals_ms=t_totals, kernels_ms=t_kernels, fused_kernel_ms=t_fused, split_kernels_ms=t_split,
                 sparse_only_kernel_ms=t_sparse, linear_kernel_ms_inferred=t_split - t_sparse,
                 module_fwd_ms=t_module, sparse_kernel_tflops=bench.tflops(flops_sparse, t_sparse),
                 linear_kernel_tflops=bench.tflops(flops_linear, max(t_split - t_sparse, 1e-6)))]


PTXAS_VARIANTS = [  # (label, kernel name, num_warps, num_stages, constexprs): the register table of NOTES_sla.md
    ("softmax kernel, v3 default", "_sla_fwd_kernel", 4, 2, dict(LINEAR_MODE=0, FUSE_PROJ=False, SAVE=True, PHI_Q=0)),
    ("linear, direct, phi read, no proj", "_sla_fwd_linear_kernel", 4, 2,
     dict(LINEAR_MODE=2, FUSE_PROJ=False, SAVE=True, PHI_Q=0, HILO=False)),
    ("linear, direct, phi read, proj epilogue", "_sla_fwd_linear_kernel", 4, 2,
     dict(LINEAR_MODE=2, PHI_Q=0, HILO=False)),
    ("linear, subtract, training call", "_sla_fwd_linear_kernel", 4, 2, dict(FUSE_PROJ=False, SAVE=True, PHI_Q=0)),
    ("linear, subtract, inference, v3 default", "_sla_fwd_linear_kernel", 4, 2, dict()),
    ("linear, + PRELOAD_TOTALS", "_sla_fwd_linear_kernel", 4, 2, dict(PRE=True)),
    ("linear, + PRELOAD_TOTALS + FOLD_PROJ", "_sla_fwd_linear_kernel", 4, 2, dict(PRE=True, FOLD=True)),
    ("linear, + PRELOAD + FOLD, phi read", "_sla_fwd_linear_kernel", 4, 2, dict(PRE=True, FOLD=True, PHI_Q=0)),
    ("linear, FOLD, phi read (v4 default)", "_sla_fwd_linear_kernel", 4, 2, dict(FOLD=True, PHI_Q=0)),
    ("phi/pool pass (v4)", "_sla_phi_pool_kernel", 4, 1, dict(BLOCK_N=64, PHI=1, WRITE_PHI=True)),
    ("totals pass, v3 default", "_sla_totals_kernel", 4, 3, dict()),
    ("totals pass, PROJ_V", "_sla_totals_kernel", 8, 2, dict(PROJ_V=True)),
    ("totals pass, PROJ_V, 4 warps", "_sla_totals_kernel", 4, 3, dict(PROJ_V=True)),
]


def ptxas_resources(variants=PTXAS_VARIANTS) -> list:
    """Registers / spills / shared memory of kernel variants compiled for sm_90a without a GPU
    (triton.compile with the divisibility the GPU run specialises on, then ptxas -v): at d128, bf16,
    64x64 blocks; reproduces the GPU's figures for the softmax kernel (187 regs / 82 KB at 4w2s)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fewer.attention.sla import triton as kernels
    defaults = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, LINEAR_MODE=1, FUSE_PROJ=True, SAVE=False, PHI_Q=1, PAIR=1,
                    HILO=True, FOLD=False, PRE=False, PROJ_V=False, PREC="tf32", INTERPRET=False)
    bf16_ptrs = {"Q", "QPHI", "V", "KPHI", "K", "OUT", "OS", "WHL", "VP", "X", "PHI_OUT"}
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for label, name, warps, stages, over in variants:
        fn = getattr(kernels, name)
        const = {k: v for k, v in {**defaults, **over}.items() if k in fn.arg_names}
        sig, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in const:
                sig[arg] = "constexpr"
            elif arg in ("Lq", "Lk", "L", "D", "Mq", "NC", "NL", "CHUNK_TILES"):
                sig[arg] = "i32"
            elif arg in bf16_ptrs or (arg == "HTOT" and const.get("HILO")):
                sig[arg] = "*bf16"
            elif arg in ("LUT_C", "LUT_L"):
                sig[arg] = "*i32"
            elif arg.isupper():
                sig[arg] = "*fp32"
            elif arg in ("qk_scale", "eps"):
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
            if sig[arg].startswith("*") or arg in ("D", "Mq"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as fh:
                fh.write(compiled.asm["ptx"])
            log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                                 capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        rows.append(dict(variant=label, kernel=name, num_warps=warps, num_stages=stages,
                         registers=int(regs.group(1)) if regs else -1,
                         spill_store_bytes=int(spills.group(1)) if spills else -1,
                         shared_bytes=compiled.metadata.shared))
    return rows


def ncu_forward() -> None:
    """One inference forward per preset at the Wan2.1-1.3B shape, 95% (run under ncu with -k regex:_sla)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for preset in ("official-sla1", "paper"):
        attn = SparseLinearAttention(128, SLAConfig.from_preset(preset, topk=0.05, backend="triton")).cuda()
        torch.nn.init.normal_(attn.proj.weight, std=0.05)
        with torch.no_grad():
            attn(q, k, v)
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the Wan2.1-1.3B shape at 95%% only")
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--no-tune", action="store_true", help="keep the kernels' default configs (no sweep)")
    parser.add_argument("--ncu-forward", action="store_true", help="only one forward per preset (for ncu)")
    parser.add_argument("--ptxas", action="store_true", help="no GPU needed: registers/spills of kernel variants")
    args = parser.parse_args(argv)
    if args.ptxas:
        bench.print_table(ptxas_resources())
        return 0
    if not torch.cuda.is_available():
        print("bench_sla needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.ncu_forward:
        ncu_forward()
        return 0
    env = bench.environment()
    print(env)
    check_rows: list = []
    if not args.skip_check:
        check_correctness(check_rows)
        bench.print_table(check_rows)
        print("csv:", bench.write_csv(check_rows, "attention", "sla_check"))
    if not args.no_tune:
        tuning: list = []
        tune(tuning)
        bench.print_table(tuning)
        print("csv:", bench.write_csv(tuning, "attention", "sla_tuning"))
    rows: list = []
    breakdown: list = []
    shapes = [s for s in SHAPES if s[0] == "wan2.1-1.3b"] if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    sparsities = (0.95,) if args.quick else SPARSITIES
    # the headline shape, its profile and the kernels' resources first, so a timeout keeps them
    bench_speed(rows, breakdown, shapes[:1], sparsities, not args.no_backward)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    prof = []
    for preset in ("official-sla1", "paper"):
        prof += profile_forward("wan2.1-1.3b", q, k, v, SLAConfig.from_preset(preset, topk=0.05, backend="triton"))
    del q, k, v
    print("csv:", bench.write_csv(prof, "attention", "sla_profile"))
    res = kernel_resources()
    print("csv:", bench.write_csv(res, "attention", "sla_kernels"))
    bench_speed(rows, breakdown, shapes[1:], sparsities, not args.no_backward)
    print("csv:", bench.write_csv(rows, "attention", "sla"))
    print("csv:", bench.write_csv(breakdown, "attention", "sla_breakdown"))
    seen = set()
    res_short = []
    for r in res:
        row = {c: r[c] for c in ("kernel", "n_regs", "n_spills", "shared_bytes", "num_warps", "num_stages")}
        if tuple(row.values()) not in seen:
            seen.add(tuple(row.values()))
            res_short.append(row)
    bench.print_table(res_short)
    for preset in sorted({r["preset"] for r in prof}):
        bench.print_table([{c: r[c][:60] if c == "kernel" else r[c] for c in ("preset", "kernel", "ms_per_forward")}
                           for r in prof if r["preset"] == preset][:8])
    bench.print_table(breakdown)
    cols = ("shape", "method", "sparsity", "density", "fwd_ms", "fwd_bwd_ms", "speedup_fwd_vs_cudnn",
            "speedup_fwd_vs_flash", "speedup_fwdbwd_vs_cudnn", "rel_l2_vs_dense")
    bench.print_table([{c: r[c] for c in cols} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())

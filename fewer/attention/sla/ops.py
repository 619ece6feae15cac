"""SLA operators: torch.library custom ops around the fused kernels, their autograd, and the
backend-resolving functional entry point ``sla_parts``.

Layers: Triton kernels (triton.py) -> ``fewer::sla_forward`` / ``fewer::sla_backward`` custom ops
(with fake functions, so torch.compile can trace them) -> autograd registration -> ``sla_parts``.
The feature map phi and the O(L d^2) totals H_tot, Z_tot are ordinary autograd ops outside the
kernel (as in the paper), so their gradients flow through PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...core import BackendUnavailable, Capability, can_run_triton, resolve_backend
from .config import SLAConfig
from .reference import (BlockPlan, MARGINAL, _pooled_scores, apply_feature_map, combine, plan_blocks,
                        sla_parts_reference)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 256

# LINEAR_MODE of the kernels (see triton.py)
MODE_NONE, MODE_SUBTRACT, MODE_DIRECT = 0, 1, 2


def _kernels():
    from . import triton as kernels  # lazy: fewer imports without Triton
    return kernels


def _dummy(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, device=ref.device, dtype=dtype)


@torch.library.custom_op("fewer::sla_forward", mutates_args=())
def sla_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qphi: torch.Tensor, kphi: torch.Tensor,
                   htot: torch.Tensor, ztot: torch.Tensor, lut_c: torch.Tensor, lut_l: torch.Tensor,
                   wpt: torch.Tensor, bp: torch.Tensor, linear_mode: int, scale: float, eps: float, block_q: int,
                   block_k: int, fuse_proj: bool, save: bool, split: bool, phi_q: int = 0,
                   fold_proj: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[BH, L, D] inputs -> (out, o_s, lse2, o_l, den); see triton.sla_forward."""
    out, o_s, lse, o_l, den = _kernels().sla_forward(q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, bp,
                                                     linear_mode, scale, eps, block_q, block_k, fuse_proj,
                                                     save, split, phi_q, fold_proj)
    return out, o_s, lse, o_l, den


@sla_forward_op.register_fake
def _(q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, bp, linear_mode, scale, eps, block_q, block_k,
      fuse_proj, save, split, phi_q=0, fold_proj=False):
    bh, lq, d = q.shape
    fuse_proj = fuse_proj and linear_mode != MODE_NONE
    parts = save or not fuse_proj
    lin = parts and linear_mode != MODE_NONE
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(q) if fuse_proj else q.new_empty(0),
            torch.empty_like(q) if parts else q.new_empty(0),
            q.new_empty(bh, lq, **f32),
            q.new_empty(bh, lq, d, **f32) if lin else q.new_empty(0, **f32),
            q.new_empty(bh, lq, **f32) if lin else q.new_empty(0, **f32))


@torch.library.custom_op("fewer::sla_backward", mutates_args=())
def sla_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qphi: torch.Tensor, kphi: torch.Tensor,
                    do_s: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, dn: torch.Tensor,
                    ddn: torch.Tensor, lut_c: torch.Tensor, lut_l: torch.Tensor, linear_mode: int,
                    scale: float, block_q: int, block_k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().sla_backward(q, k, v, qphi, kphi, do_s, lse, delta, dn, ddn, lut_c, lut_l,
                                   linear_mode, scale, block_q, block_k)


@sla_backward_op.register_fake
def _(q, k, v, qphi, kphi, do_s, lse, delta, dn, ddn, lut_c, lut_l, linear_mode, scale, block_q, block_k):
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32), v.new_empty(v.shape, **f32),
            q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32))


def _setup_context(ctx, inputs, output):
    (q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, bp, linear_mode, scale, eps, block_q, block_k,
     fuse_proj, save, split, phi_q, fold_proj) = inputs
    if (phi_q or fold_proj) and (save or not fuse_proj):
        raise RuntimeError("fewer::sla_forward: phi_q (phi(Q) inside the kernel) and fold_proj are for the "
                           "inference call only; pass qphi and the totals when the parts are saved")
    _out, o_s, lse, o_l, den = output
    ctx.save_for_backward(q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, o_s, lse, o_l, den)
    ctx.params = (linear_mode, scale, block_q, block_k, fuse_proj and linear_mode != MODE_NONE, save)


def _backward(ctx, d_out, do_s, _dlse, do_l, _dden):
    q, k, v, qphi, kphi, htot, ztot, lut_c, lut_l, wpt, o_s, lse, o_l, den = ctx.saved_tensors
    linear_mode, scale, block_q, block_k, fused, save = ctx.params
    dwpt = dbp = None
    if fused:
        if not save:
            raise RuntimeError("fewer::sla_forward ran with fuse_proj=True, save=False (inference), so it kept "
                               "no parts for the backward; call it with save=True when gradients are needed")
        if d_out is not None:
            # out = O_s + O_l @ Wp^T + b: O_s and O_l receive d_out (through Wp), Wp^T and b their sums
            d_out32 = d_out.float()
            do_s = d_out if do_s is None else do_s + d_out
            extra = d_out32 @ wpt.transpose(0, 1)
            do_l = extra if do_l is None else do_l.float() + extra
            dwpt = o_l.reshape(-1, o_l.shape[-1]).transpose(0, 1) @ d_out32.reshape(-1, d_out32.shape[-1])
            dbp = d_out32.reshape(-1, d_out32.shape[-1]).sum(0)
    if do_s is None:
        do_s = torch.zeros_like(o_s)
    delta = (do_s.float() * o_s.float()).sum(-1)
    if linear_mode != MODE_NONE and do_l is not None:
        do_l = do_l.float()
        dn32 = do_l / den.unsqueeze(-1)
        ddn = -(do_l * o_l).sum(-1) / den
    else:
        dn32 = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        ddn = torch.zeros(q.shape[:-1], device=q.device, dtype=torch.float32)
    dq, dk, dv, dqphi, dkphi = sla_backward_op(q, k, v, qphi, kphi, do_s.contiguous(), lse, delta,
                                               dn32.to(q.dtype).contiguous(), ddn.contiguous(), lut_c, lut_l,
                                               linear_mode, scale, block_q, block_k)
    dhtot = dztot = None
    if linear_mode == MODE_SUBTRACT:
        # the totals' share: O_l numerator starts from phi(Q) H_tot, denominator from phi(Q) Z_tot
        dqphi = dqphi + dn32 @ htot.transpose(-2, -1) + ddn.unsqueeze(-1) * ztot.unsqueeze(-2)
        qphi32 = qphi.float()
        dhtot = qphi32.transpose(-2, -1) @ dn32
        dztot = (qphi32 * ddn.unsqueeze(-1)).sum(-2)
    if linear_mode == MODE_NONE:
        dqphi = dkphi = None
    else:
        dqphi, dkphi = dqphi.to(qphi.dtype), dkphi.to(kphi.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dqphi, dkphi, dhtot, dztot,
            None, None, dwpt, dbp, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fewer::sla_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("fewer::sla_totals", mutates_args=())
def sla_totals_op(kphi: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H_tot = phi(K)^T V [BH, D, D], Z_tot = sum_t phi(K_t) [BH, D], fp32 (one Triton pass)."""
    return _kernels().sla_totals(kphi, v)


@sla_totals_op.register_fake
def _(kphi, v):
    bh, _, d = kphi.shape
    return kphi.new_empty(bh, d, d, dtype=torch.float32), kphi.new_empty(bh, d, dtype=torch.float32)


def _totals_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _totals_backward(ctx, dhtot, dztot):
    kphi, v = ctx.saved_tensors
    dkphi = torch.zeros(kphi.shape, device=kphi.device, dtype=torch.float32)
    dv = None
    if dhtot is not None:
        dkphi = dkphi + v.float() @ dhtot.transpose(-2, -1)
        dv = (kphi.float() @ dhtot).to(v.dtype)
    if dztot is not None:
        dkphi = dkphi + dztot.unsqueeze(-2)
    return dkphi.to(kphi.dtype), dv


torch.library.register_autograd("fewer::sla_totals", _totals_backward, setup_context=_totals_setup)


@torch.library.custom_op("fewer::sla_phi_pool", mutates_args=())
def sla_phi_pool_op(x: torch.Tensor, block: int, phi: int, write_phi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference only: (phi(x) or an empty tensor, fp32 means of the ``block``-token blocks) of x [BH, L, D]."""
    out, pooled = _kernels().sla_phi_pool(x, block, phi, write_phi)
    return (out if out is not None else x.new_empty(0)), pooled


@sla_phi_pool_op.register_fake
def _(x, block, phi, write_phi):
    bh, length, d = x.shape
    return (torch.empty_like(x) if write_phi else x.new_empty(0),
            x.new_empty(bh, -(-length // block), d, dtype=torch.float32))


def linear_totals(kphi: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_tot, Z_tot) in fp32: the Triton pass for head dims it takes, else PyTorch in fp32."""
    if kphi.shape[-1] <= _kernels().MAX_TOTALS_HEAD_DIM:
        return sla_totals_op(kphi, v)
    kphi32 = kphi.float()
    return kphi32.transpose(-2, -1) @ v.float(), kphi32.sum(-2)


# ---------------------------------------------------------------------------------------------
# Input checks and backend resolution
# ---------------------------------------------------------------------------------------------

def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"SLA: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"SLA: {name} must be [B, H, L, D]; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"SLA: {name} must be a floating-point tensor; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"SLA: query, key and value must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"SLA: batch/head/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (use enable_gqa through sdpa for fewer key heads)")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"SLA: q, k and v must share the head dim (the linear branch maps d -> d); "
                         f"got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("SLA: query and key lengths must be positive")


def _triton_check(q: torch.Tensor, cfg: SLAConfig) -> Capability:
    cap = can_run_triton(q.device)
    if not cap:
        return cap
    if q.dtype not in KERNEL_DTYPES:
        return Capability(False, f"the SLA kernels take float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        return Capability(False, f"the SLA kernels take head dims up to {MAX_KERNEL_HEAD_DIM}, got {q.shape[-1]}")
    if cfg.block_q not in (16, 32, 64, 128) or cfg.block_k not in (16, 32, 64, 128):
        return Capability(False, f"the SLA kernels take block sizes 16, 32, 64 or 128; got "
                                 f"block_q={cfg.block_q}, block_k={cfg.block_k}")
    return Capability(True, "fused SLA Triton kernels")


def resolve(q: torch.Tensor, cfg: SLAConfig) -> str:
    """The SLA backend that runs these inputs: 'triton' or 'reference' (explicit ones must run)."""
    if cfg.backend == "triton":
        cfg.check_kernel_blocks()
        if q.dtype not in KERNEL_DTYPES:
            raise ValueError(f"SLA backend 'triton' takes float16, bfloat16 or float32 inputs; got {q.dtype} "
                             "(use backend='reference' for float64)")
    candidates = {"triton": lambda: _triton_check(q, cfg),
                  "reference": lambda: Capability(True, "pure PyTorch")}
    return resolve_backend("attention.sla", cfg.backend, candidates)


# ---------------------------------------------------------------------------------------------
# Functional entry point
# ---------------------------------------------------------------------------------------------

def _marginal_lut(plan: BlockPlan) -> torch.Tensor:
    """Key-block ids of the marginal blocks per query block [B, H, Mq, n_marginal]."""
    not_marginal = (plan.classes != MARGINAL).to(torch.int8)
    order = torch.argsort(not_marginal, dim=-1, stable=True)
    return order[..., :plan.num_marginal].to(torch.int32).contiguous()


def linear_mode_for(plan: BlockPlan, cfg: SLAConfig) -> int:
    if cfg.linear_scope == "all" or plan.num_marginal == 0:
        return MODE_NONE
    # subtract from the totals unless the marginal blocks are the fewer to visit; the critical
    # blocks are free to subtract (their K/V tiles are loaded anyway), so only negligible ones count
    return MODE_SUBTRACT if plan.num_negligible <= plan.num_marginal else MODE_DIRECT


def _feature_map_lowp(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.float32 or name != "elu":
        return apply_feature_map(x, name)
    return (F.elu(x.float()) + 1.0).to(x.dtype)  # elu+1 rounded once


def _linear_all(qphi32: torch.Tensor, kphi32: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    num = qphi32 @ (kphi32.transpose(-2, -1) @ v.float())
    den = qphi32 @ kphi32.sum(-2).unsqueeze(-1)
    return num / (den + eps)


PHI_CODES = {"softmax": 1, "elu": 2, "relu": 3}


def _kernel_inputs(q, k, v, cfg: SLAConfig, plan: BlockPlan, mode: int, phi_in_kernel: bool = False,
                   totals: bool = True, phi: tuple | None = None):
    """The fused kernels' [BH, L, D] operands, LUTs, feature maps and totals for one call
    (``phi_in_kernel``: phi(Q) is left to the kernel, qphi is a dummy; ``totals=False``: the
    kernels compute the totals themselves (folded projection), htot/ztot are dummies; ``phi``:
    (phi(Q) or None, phi(K)) from the phi/pool pass)."""
    b, h, _, d = q.shape
    qc, kc, vc = (t.reshape(b * h, -1, d).contiguous() for t in (q, k, v))
    mq = plan.critical.shape[2]
    lut_c = plan.critical.reshape(b * h, mq, -1).contiguous()
    if mode == MODE_NONE:
        qphi = kphi = _dummy(q, q.dtype)
        htot = ztot = _dummy(q, torch.float32)
        lut_l = lut_c[..., :0]
    else:
        # phi in q's dtype in one pass (torch's half softmax accumulates in fp32); the totals use
        # the same rounded values, so subtracting a block cancels its share up to accumulation order
        if phi is not None:
            qphi, kphi = (phi[0] if phi[0] is not None else _dummy(q, q.dtype)), phi[1]
        else:
            qphi = _dummy(q, q.dtype) if phi_in_kernel else _feature_map_lowp(qc, cfg.feature_map)
            kphi = _feature_map_lowp(kc, cfg.feature_map)
        if mode == MODE_SUBTRACT:
            lut_l = plan.negligible.reshape(b * h, mq, -1).contiguous()
            htot, ztot = linear_totals(kphi, vc) if totals else (_dummy(q, torch.float32), _dummy(q, torch.float32))
        else:
            lut_l = _marginal_lut(plan).reshape(b * h, mq, -1).contiguous()
            htot = ztot = _dummy(q, torch.float32)
    return qc, kc, vc, qphi, kphi, htot, ztot, lut_c, lut_l


def _split_forward(block_q: int) -> bool:
    return _kernels().SPLIT_FORWARD.get(block_q, False)


@torch.no_grad()
def plan_blocks_kernel(q: torch.Tensor, k: torch.Tensor, cfg: SLAConfig, scale: float | None = None,
                       pooled: tuple | None = None) -> BlockPlan:
    """``plan_blocks`` (its twin and oracle) with the top-k/bottom-k selection and the class map in
    one Triton pass (a sort per row) instead of torch.topk + scatter: the same plan up to ties."""
    scores = _pooled_scores(q, k, cfg, scale, pooled)
    n_crit, n_neg = cfg.block_counts(scores.shape[-1])
    return BlockPlan(*_kernels().sla_plan(scores, n_crit, n_neg))


def _plan(q, k, cfg: SLAConfig, scale: float, backend: str, pooled: tuple | None = None) -> BlockPlan:
    if backend == "triton" and k.shape[-2] <= cfg.block_k * _kernels().MAX_PLAN_KEY_BLOCKS:
        return plan_blocks_kernel(q, k, cfg, scale, pooled)
    return plan_blocks(q, k, cfg, scale, pooled)


def _plan_with_phi(q, k, cfg: SLAConfig, scale: float, backend: str, phi_in_kernel: bool):
    """Inference: (plan, (phi(Q) or None, phi(K))) from one Triton pass over each of Q and K (the
    pooled blocks for the plan and the feature maps), instead of torch means and softmaxes."""
    b, h, _, d = q.shape
    code = PHI_CODES[cfg.feature_map]
    qphi, pq = sla_phi_pool_op(q.reshape(b * h, -1, d).contiguous(), cfg.block_q, code, not phi_in_kernel)
    kphi, pk = sla_phi_pool_op(k.reshape(b * h, -1, d).contiguous(), cfg.block_k, code, True)
    plan = _plan(q, k, cfg, scale, backend, (pq.reshape(b, h, -1, d), pk.reshape(b, h, -1, d)))
    return plan, (None if phi_in_kernel else qphi, kphi)


def sla_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SLAConfig, scale: float | None = None,
              plan: BlockPlan | None = None) -> tuple[torch.Tensor, torch.Tensor, BlockPlan]:
    """(O_s in q's dtype, O_l in fp32, plan) through the backend ``cfg.backend`` resolves to."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = resolve(q, cfg)
    if plan is None:
        plan = _plan(q, k, cfg, scale, backend)
    if backend == "reference":
        o_s, o_l = sla_parts_reference(q, k, v, cfg, scale, plan,
                                       compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return o_s.to(q.dtype), o_l, plan

    b, h, lq, d = q.shape
    mode = linear_mode_for(plan, cfg)
    args = _kernel_inputs(q, k, v, cfg, plan, mode)
    none32 = _dummy(q, torch.float32)
    _out, o_s, _lse, o_l, _den = sla_forward_op(*args, none32, none32, mode, scale, cfg.linear_eps, cfg.block_q,
                                                cfg.block_k, False, True, _split_forward(cfg.block_q))
    o_s = o_s.reshape(b, h, lq, d)
    if cfg.linear_scope == "all":
        o_l = _linear_all(apply_feature_map(q.float(), cfg.feature_map), apply_feature_map(k.float(), cfg.feature_map),
                          v, cfg.linear_eps)
    elif mode == MODE_NONE:
        o_l = torch.zeros(b, h, lq, d, device=q.device, dtype=torch.float32)
    else:
        o_l = o_l.reshape(b, h, lq, d)
    return o_s, o_l, plan


def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SLAConfig,
                  proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None, scale: float | None = None,
                  plan: BlockPlan | None = None) -> tuple[torch.Tensor, BlockPlan]:
    """(O = O_s + proj(O_l) in q's dtype, plan). Where the kernels run and the linear part is in
    them, the projection is applied in the kernel's epilogue (no fp32 O_l round trip); the parts
    the backward needs are written only when autograd will ask for them."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = resolve(q, cfg)
    b, h, lq, d = q.shape
    fusable = (proj_weight is not None and backend == "triton" and proj_weight.shape == (d, d)
               and proj_weight.dtype == torch.float32 and proj_weight.device == q.device)
    bias = proj_bias if proj_bias is not None else torch.zeros(d, device=q.device, dtype=torch.float32)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, proj_weight, bias) if t is not None)
    kernels = _kernels() if fusable else None
    # inference: phi(Q) inside the kernel (one pass over Q fewer); training keeps it an autograd op
    phi_q = 0 if (not fusable or save or not kernels.PHI_IN_KERNEL) else PHI_CODES[cfg.feature_map]
    phi = None
    if plan is None and fusable and not save and kernels.PHI_POOL_PASS and cfg.linear_scope != "all":
        plan, phi = _plan_with_phi(q, k, cfg, scale, backend, phi_q != 0)
    if plan is None:
        plan = _plan(q, k, cfg, scale, backend)
    mode = linear_mode_for(plan, cfg)
    if not fusable or mode == MODE_NONE:
        out_sparse, out_linear, plan = sla_parts(q, k, v, cfg, scale, plan)
        return combine(out_sparse, out_linear, proj_weight, proj_bias, q.dtype), plan
    split = _split_forward(cfg.block_q)
    fold = (kernels.FOLD_PROJ and not save and split and mode == MODE_SUBTRACT and q.dtype == torch.bfloat16
            and d <= kernels.MAX_TOTALS_HEAD_DIM)
    args = _kernel_inputs(q, k, v, cfg, plan, mode, phi_in_kernel=phi_q != 0, totals=not fold, phi=phi)
    out, *_ = sla_forward_op(*args, proj_weight.t().contiguous(), bias.float().contiguous(), mode, scale,
                             cfg.linear_eps, cfg.block_q, cfg.block_k, True, save, split, phi_q, fold)
    return out.reshape(b, h, lq, d), plan

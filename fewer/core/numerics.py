"""Error metrics between an output and a reference, computed in float64.

Every function takes (out, ref) in that order and returns a Python float.
"""

from __future__ import annotations

import math

import torch


def _pair(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    return out.detach().to("cpu", torch.float64).flatten(), ref.detach().to("cpu", torch.float64).flatten()


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum|out - ref| / sum|ref|."""
    o, r = _pair(out, ref)
    return float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300))


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||."""
    o, r = _pair(out, ref)
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def cos_sim(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 is identical direction)."""
    o, r = _pair(out, ref)
    denom = (o.norm() * r.norm()).clamp_min(1e-300)
    return float((o @ r) / denom)


def rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    return float((o - r).pow(2).mean().sqrt())


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    return float((o - r).abs().max())


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(||ref||^2 / ||out - ref||^2); inf when exact."""
    o, r = _pair(out, ref)
    noise = float((o - r).pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(float(r.pow(2).sum()) / noise)


def error_report(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"cos_sim": cos_sim(out, ref), "rel_l1": rel_l1(out, ref), "rmse": rmse(out, ref),
            "sqnr_db": sqnr_db(out, ref), "max_abs": max_abs(out, ref)}

"""An explicit, straight-line reference of a quantized linear layer's three GEMMs (for the tests).

It repeats the documented formulas with fewer.formats directly (fake_quantize, random_hadamard_transform),
with the seeds and streams the layer documents, and none of linear.py's control flow.
"""

from __future__ import annotations

import torch

from fewer.formats import fake_quantize, random_hadamard_transform
from fewer.fqt.linear import ROLE_STREAMS, hadamard_signs
from fewer.fqt.recipe import Recipe, RoleConfig


def fq(x: torch.Tensor, rc: RoleConfig, dim: int, seed: int, role: str) -> torch.Tensor:
    if not rc.quantized:
        return x.float()
    kw = dict(dim=dim, rounding=rc.rounding, scale_rounding=rc.formats_scale_rounding)
    if rc.rounding == "stochastic":
        kw.update(seed=seed, stream=ROLE_STREAMS[role])
    return fake_quantize(x.float(), rc.spec_name, **kw).float()


def rht(x: torch.Tensor, recipe: Recipe, seed: int, gemm: str, role: str, dim: int) -> torch.Tensor:
    if not getattr(recipe, role).hadamard:
        return x
    return random_hadamard_transform(x, hadamard_signs(recipe, seed, gemm), block=16, dim=dim)


def reference(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, recipe: Recipe, seed: int):
    """(Y, dX, dW) for X [T, K], W [N, K], upstream gradient g [T, N]; no OutControl, no forward RHT."""
    xq = fq(x, recipe.x, -1, seed, "x")
    wq = fq(w, recipe.w, -1, seed, "w")
    y = xq @ wq.t()
    # dgrad: reduction over N
    w_src = wq if recipe.w_dgrad.source == "forward" else w.float()
    a = fq(rht(g, recipe, seed, "dgrad", "dy_dgrad", -1), recipe.dy_dgrad, -1, seed, "dy_dgrad")
    b = fq(rht(w_src, recipe, seed, "dgrad", "w_dgrad", 0), recipe.w_dgrad, 0, seed, "w_dgrad")
    dx = a @ b
    # wgrad: reduction over T, zero-padded to a multiple of 128
    x_src = xq if recipe.x_wgrad.source == "forward" else x.float()
    pad = (-g.shape[0]) % 128
    gp = torch.cat([g.float(), g.new_zeros(pad, g.shape[1])]) if pad else g.float()
    xp = torch.cat([x_src, x_src.new_zeros(pad, x_src.shape[1])]) if pad else x_src
    a = fq(rht(gp, recipe, seed, "wgrad", "dy_wgrad", 0), recipe.dy_wgrad, 0, seed, "dy_wgrad")
    b = fq(rht(xp, recipe, seed, "wgrad", "x_wgrad", 0), recipe.x_wgrad, 0, seed, "x_wgrad")
    dw = a.t() @ b
    return y, dx, dw

"""Diagnostics of a recipe on one layer: backward bias (mean of N passes vs the STE gradient) and GEMM SNR.

    python -m fewer.fqt.diagnostics              # both tables for every preset, CPU, about a minute

* :func:`bias_curve`: the relative error ||mean of n backward passes - g_STE|| / ||g_STE|| for dX and dW,
  where g_STE is the straight-through gradient of the *quantized* forward graph (dX = dY Q(W),
  dW = dY^T Q(X)). An unbiased backward decays as 1/sqrt(n); a biased one levels off at its bias.
* :func:`gemm_snr`: SNR (dB) of Y, dX and dW of one call against the unquantized layer (notes
  section 8.5's per-layer metric), optionally with OutControl channels given.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..core import sqnr_db
from .linear import QuantLinear, quantize_operand
from .recipe import PRESETS, Recipe, get_recipe


def _grads(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


def _data(t: int, k: int, n: int, seed: int, outliers: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen)
    if outliers:
        idx = torch.randperm(k, generator=gen)[:outliers]
        x[:, idx] *= 20.0
    g = torch.randn(t, n, generator=gen)
    return x, g


def bias_curve(recipe: Recipe | str, ns=(1, 16, 64, 256), *, t: int = 128, k: int = 128, n: int = 128,
               seed: int = 1) -> dict[int, tuple[float, float]]:
    """{n: (rel error of mean dX, rel error of mean dW)} against the quantized-forward STE gradient."""
    recipe = get_recipe(recipe)
    torch.manual_seed(seed)
    layer = QuantLinear(k, n, bias=False, recipe=recipe, fqt_seed=11)
    x, g = _data(t, k, n, seed)
    with torch.no_grad():
        wq = layer.quantized_weight()
        xq = quantize_operand(x, recipe.x, -1, rounding="nearest")
    ste_dx, ste_dw = g @ wq, g.t() @ xq
    sum_dx, sum_dw = torch.zeros_like(ste_dx), torch.zeros_like(ste_dw)
    out, done = {}, 0
    for target in sorted(ns):
        while done < target:
            _, dx, dw = _grads(layer, x, g)
            sum_dx += dx
            sum_dw += dw
            done += 1
        out[target] = (float((sum_dx / done - ste_dx).norm() / ste_dx.norm()),
                       float((sum_dw / done - ste_dw).norm() / ste_dw.norm()))
    return out


def gemm_snr(recipe: Recipe | str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
             fp8_channels: torch.Tensor | None = None) -> dict[str, float]:
    """SNR (dB) of Y, dX, dW of one quantized call against the unquantized product."""
    recipe = get_recipe(recipe)
    k, n = x.shape[-1], g.shape[-1]
    layer = QuantLinear(k, n, bias=False, recipe=recipe)
    ref = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
        ref.weight.copy_(w)
    if fp8_channels is not None:
        layer.fp8_channels = fp8_channels
    q, r = _grads(layer, x, g), _grads(ref, x, g)
    return {name: sqnr_db(a, b) for name, a, b in zip(("Y", "dX", "dW"), q, r)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewer.fqt.diagnostics", description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--presets", nargs="+", default=["nvfp4_naive", "nvidia_nvfp4", "tetrajet_v2",
                                                          "tetrajet_v2_released"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("backward bias: rel. error of the mean of n passes vs the quantized-forward STE gradient "
          "(128x128 layer, 128 tokens, Gaussian)")
    print(f"{'preset':<24}" + "".join(f"{'n=' + str(n) + ' dX / dW':>22}" for n in args.ns)
          + f"{'sqrt(n_max) e(n_max)/e(1) dX / dW':>36}")
    for name in args.presets:
        curve = bias_curve(name, args.ns)
        e1, em = curve[args.ns[0]], curve[args.ns[-1]]
        f = math.sqrt(args.ns[-1] / args.ns[0])
        print(f"{name:<24}" + "".join(f"{c[0]:>11.4f} /{c[1]:>8.4f}" for c in curve.values())
              + f"{em[0] * f / e1[0]:>26.2f} / {em[1] * f / e1[1]:.2f}")
    print("\nSNR (dB) against the unquantized layer, 512 tokens, 256 -> 256, Gaussian X with 16 channels x20:")
    x, g = _data(512, 256, 256, seed=2, outliers=16)
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    top = torch.sort(torch.argsort(x.norm(dim=0), descending=True)[:32]).values
    print(f"{'preset':<28}{'Y':>8}{'dX':>8}{'dW':>8}")
    for name in PRESETS:
        if name in ("tetrajet_v2_oscireset", "tetrajet_v2_full"):
            continue
        chans = top if get_recipe(name).outcontrol.enabled else None
        s = gemm_snr(name, x, w, g, chans)
        label = name + (" (top-32 in MXFP8)" if chans is not None else "")
        print(f"{label:<28}" + "".join(f"{s[k]:>8.2f}" for k in ("Y", "dX", "dW")))


if __name__ == "__main__":
    main()

"""Tour: round-trip error of every number format, and the unbiasedness of stochastic rounding."""

from __future__ import annotations

import torch

ORDER = 20
TITLE = "Number formats: round-trip error and unbiased stochastic rounding"


def _outlier_tensor(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[: cols // 64]] *= 20.0      # a few outlier channels, as in LLM activations
    return x.to(torch.bfloat16).to(device)


def run(ctx) -> None:
    from ...core import rel_l2, sqnr_db
    from ...formats import SPECS, quantize, quantize_nvfp4

    rows, cols = (256, 512) if ctx.scale == "cpu" else (4096, 4096)
    x = _outlier_tensor(rows, cols, ctx.seed, ctx.device)
    ref = x.float()
    table = []
    for name, spec in SPECS.items():
        q = quantize(x, spec, dim=-1)
        out = q.dequantize()
        table.append({"format": name, "element": spec.element.name, "block": spec.describe()["block"],
                      "scale": spec.describe()["scale"], "bits/value": round(q.nbytes() * 8 / x.numel(), 3),
                      "SQNR dB (RTN)": round(sqnr_db(out, ref), 2), "rel L2": rel_l2(out, ref)})
    ctx.add(f"Round trip (quantize, dequantize) of a bf16 {rows}x{cols} N(0,1) tensor with "
            f"{cols // 64} outlier channels (x20), quantized along the last dim with nearest-even rounding.")
    ctx.add_table(table)
    ctx.results["formats_sqnr_db"] = {r["format"]: r["SQNR dB (RTN)"] for r in table}

    # SR unbiasedness: average N draws of TetraJet-v2's double-block quantizer; the error to x falls
    # like 1/sqrt(N) when unbiased, and stalls when block scales are rounded to nearest (block maxima clip).
    small = x[:64].float()
    counts = (1, 4, 16, 64)
    sr_rows = []
    for scale_rounding in ("up", "nearest"):
        acc = torch.zeros_like(small)
        errors, done = {}, 0
        for n in counts:
            while done < n:
                acc += quantize_nvfp4(small, second_level="outer128", rounding="stochastic", seed=ctx.seed * 1000 + done,
                                      scale_rounding=scale_rounding).dequantize()
                done += 1
            errors[n] = rel_l2(acc / n, small)
        sr_rows.append({"block scales": scale_rounding, **{f"rel L2, N={n}": errors[n] for n in counts},
                        "N=1 / N=64": round(errors[1] / errors[64], 2)})
    ctx.add("Mean of N stochastic-rounding draws of the NVFP4 double-block quantizer (1x16 E4M3 + 1x128 FP32): "
            "unbiased SR error shrinks like 1/sqrt(N) (ratio 8 from N=1 to 64); with block scales rounded to "
            "nearest the clipped block maxima leave a bias floor.")
    ctx.add_table(sr_rows)
    ctx.results["formats_sr_ratio"] = {r["block scales"]: r["N=1 / N=64"] for r in sr_rows}

"""Tour: few-step distillation (sCM, rCM, DMD-only). A live check that the analytic 2-D teacher's ODE
reproduces the mixture, then the committed results tables (3 seeds, CPU) and sample plots read from
benchmarks/results/cpu/distill_*.csv (``fewer distill toy|digits --preset cpu`` regenerates them)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

ORDER = 60
TITLE = "Few-step distillation: sCM, rCM, DMD"

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "cpu"


def _read(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _table(rows: list[dict], metrics: list[str]) -> list[dict]:
    out = []
    for r in rows:
        row = {"method": r["method"], "steps": r["steps"], "lam": r.get("lam", "")}
        for m in metrics:
            if r.get(m) not in (None, ""):
                std = r.get(m + "_std")
                row[m] = f"{float(r[m]):.4g}" + (f" ± {float(std):.2g}" if std not in (None, "", "0") else "")
        out.append(row)
    return out


def _main_names(samples: dict, first: str, lam: str) -> list[str]:
    """The first sample set, then every method's k-step sets; rCM only at the main table's lambda."""
    keep = [first]
    for n in samples:
        if "-step" in n and ("lam=" not in n or n.endswith(f"lam={lam}")):
            keep.append(n)
    return keep


def _main_lam(rows: list[dict]) -> str:
    lams = [r["lam"] for r in rows if r["method"] == "rcm" and r.get("lam")]
    return str(float(lams[0])) if lams else ""


def _plot_toy(ctx, samples: dict, lam: str) -> None:
    import matplotlib.pyplot as plt
    names = _main_names(samples, "reference", lam)
    cols = 5
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        x = samples[name]
        ax.scatter(x[:, 0], x[:, 1], s=1, c=(torch.arange(x.shape[0]) % 2).numpy(), cmap="coolwarm")
        ax.set_title(name, fontsize=7)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_xticks([])
        ax.set_yticks([])
    ctx.add_figure(fig, "distill_toy_samples", "2-D ring (CFG 2, two classes): analytic-teacher reference and "
                   "students at 1/2/4 steps (seed 0, same noise)")


def _plot_digits(ctx, samples: dict, lam: str) -> None:
    import matplotlib.pyplot as plt
    names = _main_names(samples, "teacher", lam)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 0.75 * len(names)))
    for ax, name in zip(axes, names):
        x = samples[name][:10].reshape(-1, 8, 8)
        ax.imshow(torch.cat(list(x), dim=1).numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    ctx.add_figure(fig, "distill_digits_samples", "Digits (classes 0-9, CFG 2): DiT teacher (50 steps) and "
                   "students (seed 0, same noise)")


def run(ctx) -> None:
    from fewer.distill import AnalyticGMMTeacher, energy_distance, per_sample_noise, ring, teacher_sample
    from fewer.distill.recipe import read_sample_csv

    gmm = ring()
    teacher = AnalyticGMMTeacher(gmm)
    n = 1000
    out = teacher_sample(teacher, per_sample_noise(range(n), (2,), 1)[0], steps=100)
    data, _, _ = gmm.sample(n, torch.Generator().manual_seed(ctx.seed))
    mass = torch.bincount(gmm.nearest_mode(out).clamp_min(0), minlength=8).double() / n
    ctx.add("Live check: the analytic teacher's probability-flow ODE (100 DDIM steps, no guidance) maps "
            f"N(0, sigma_d^2) onto the 8-mode ring: energy distance to data {energy_distance(out, data):.4f}; "
            f"largest mode-mass error {float((mass - gmm.weights).abs().max()):.3f}.\n")
    specs = [("distill_toy.csv", ["precision", "modes_covered", "energy", "paired_l2", "speedup"], "2-D ring toy"),
             ("distill_digits.csv", ["frechet_distance", "class_accuracy", "precision", "recall", "diversity",
                                     "paired_l2", "speedup"], "Digits (DiT teacher)")]
    for name, metrics, title in specs:
        path = RESULTS / name
        if not path.exists():
            ctx.add(f"*{name} not found; run `fewer distill {name.split('_')[1][:-4]} --preset cpu --out "
                    f"benchmarks/results/cpu`.*")
            continue
        ctx.add_table(_table(_read(path), metrics), f"{title}: mean ± std over seeds ({path.name})")
        sweep = path.with_name(path.stem + "_lambda.csv")
        if sweep.exists():
            ctx.add_table(_table(_read(sweep), metrics), f"{title}: rCM lambda sweep, seed 0 ({sweep.name})")
        calibrated = path.with_name(path.stem + "_rcm_lam0.1.csv")
        if calibrated.exists():
            rows = [r for r in _read(calibrated) if r["method"] == "rcm"]
            ctx.add_table(_table(rows, metrics), f"{title}: rCM at lambda 0.1, mean ± std over seeds ({calibrated.name})")
    ablation = RESULTS / "distill_toy_scm_ablation.csv"
    if ablation.exists():
        rows = [{"variant": r["variant"], "steps": r["steps"],
                 **{m: f"{float(r[m]):.3g}" for m in ("precision", "modes_covered", "energy")}} for r in _read(ablation)]
        ctx.add_table(rows, f"2-D toy: sCM switches, mean of 2 seeds ({ablation.name})")
    toy = RESULTS / "distill_toy_samples.csv"
    digits = RESULTS / "distill_digits_samples.csv"
    if toy.exists():
        _plot_toy(ctx, read_sample_csv(toy), _main_lam(_read(RESULTS / "distill_toy.csv")))
    if digits.exists():
        _plot_digits(ctx, read_sample_csv(digits), _main_lam(_read(RESULTS / "distill_digits.csv")))
    ctx.add("See fewer/distill/README.md for the reading of these tables and what is not reproduced.")

"""The SLA fine-tuning recipe (issue 5, item 4): dense DiT -> sparse-only / linear-only / SLA.

    from fewer.attention.sla.recipe import SLARecipeConfig, run_sla_recipe, summarize
    rows = run_sla_recipe(SLARecipeConfig.from_preset("cpu"))      # one row per (method, sparsity, seed)
    table = summarize(rows)                                        # mean and std over seeds

    python -m fewer.attention.sla.recipe --preset cpu              # writes benchmarks/results/cpu/sla_recipe*.csv

Steps: train one dense class-conditional DiT (the teacher) with the TrigFlow flow-matching loss;
for every method, sparsity and seed, convert a copy and fine-tune it for the same number of steps
with the same loss on data (not distillation); sample every model from the same noise and score
the samples with the digit classifier (class accuracy, Frechet distance against the real test
set) and against the teacher's own samples (PSNR, SSIM). Methods:

- ``dense``: no conversion (fine-tuning alone, the reference row);
- ``sparse-only``: the same critical blocks as SLA, no linear branch (the marginal blocks are
  declared negligible, so the linear part is exactly zero);
- ``linear-only``: linear attention with phi over all tokens, no softmax part;
- ``sla``: critical blocks by softmax, the rest by linear attention through the zero-initialised
  projection.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.config import Config, ConfigError, check_choice, check_positive_int, check_range
from ...core.seed import per_sample_generators, randn_per_sample
from ...models.denoiser import LogNormalTime, TrigFlowDenoiser, flow_matching_steps, sample_ode
from ...models.dit import Attention, DiT, DiTConfig
from .config import SLAConfig
from .module import convert_to_sla_, projection_parameters, sla_modules
from .reference import linear_only_reference

METHODS = ("dense", "sparse-only", "linear-only", "sla")
DATASETS = ("digits", "mnist16", "mnist32")
METRICS = ("class_accuracy", "frechet_distance", "psnr", "ssim", "final_loss", "skipped_updates", "softmax_density")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLARecipeConfig(Config):
    """What the recipe trains and measures.

    The DiT sees ``(image side / patch_size)^2`` tokens; SLA groups them in blocks of ``block``
    tokens, and a sparsity s keeps floor((1 - s) * blocks) >= 1 critical key blocks per query
    block, so 90% and 95% need about 20 or more key blocks per row.
    """

    dataset: str = "mnist16"          # "digits" (8x8), "mnist16" (MNIST averaged to 16x16), "mnist32" (padded)
    dim: int = 64
    depth: int = 3
    heads: int = 2
    patch_size: int = 2
    block: int = 2                    # SLA block_q = block_k (tokens)
    teacher_steps: int = 3000
    teacher_lr: float = 2e-3
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    batch_size: int = 64
    methods: tuple[str, ...] = METHODS
    sparsities: tuple[float, ...] = (0.90, 0.95)
    seeds: tuple[int, ...] = (0, 1, 2)
    feature_map: str = "softmax"      # phi of the linear branch (SLA and linear-only)
    classifier_steps: int = 400
    num_samples: int = 200            # class-balanced samples per model, from the same noise for every model
    sample_steps: int = 8             # Heun steps (2 * steps - 1 network calls)
    guidance_scale: float = 2.0
    sigma_d: float = 0.5
    teacher_cache: str = ""           # a .pt path: reuse the teacher trained with the same settings

    def validate(self) -> None:
        check_choice(self, "dataset", DATASETS)
        for name in ("dim", "depth", "heads", "patch_size", "block", "teacher_steps", "finetune_steps",
                     "batch_size", "classifier_steps", "num_samples", "sample_steps"):
            check_positive_int(self, name)
        for name in ("teacher_lr", "finetune_lr", "sigma_d"):
            check_range(self, name, 0.0, None, low_open=True)
        check_range(self, "guidance_scale", 0.0, None)
        check_choice(self, "feature_map", ("softmax", "elu", "relu"))
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ConfigError(f"SLARecipeConfig.methods={self.methods!r} is not allowed: expected a non-empty "
                              f"tuple drawn from {METHODS}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"SLARecipeConfig.seeds={self.seeds!r} is not allowed: expected a non-empty tuple "
                              "of integers >= 0")
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ConfigError(f"SLARecipeConfig.sparsities={self.sparsities!r} is not allowed: expected a "
                              "non-empty tuple of fractions in (0, 1)")
        side = self.image_size
        if side % self.patch_size:
            raise ConfigError(f"SLARecipeConfig.patch_size={self.patch_size} is not allowed: the {self.dataset} "
                              f"images are {side}x{side}; expected a divisor of {side}")
        tokens = (side // self.patch_size) ** 2
        if self.block > tokens:
            raise ConfigError(f"SLARecipeConfig.block={self.block} is not allowed: the DiT sees only {tokens} "
                              "tokens; expected a block no larger than that")
        if self.dim % self.heads or self.dim % 4:
            raise ConfigError(f"SLARecipeConfig.dim={self.dim} is not allowed: expected a multiple of 4 and of "
                              f"heads={self.heads}")

    @property
    def image_size(self) -> int:
        return {"digits": 8, "mnist16": 16, "mnist32": 32}[self.dataset]

    @property
    def key_blocks(self) -> int:
        return math.ceil((self.image_size // self.patch_size) ** 2 / self.block)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(input_size=self.image_size, in_channels=1, patch_size=self.patch_size, dim=self.dim,
                         depth=self.depth, heads=self.heads, num_classes=10)

    def sla_config(self, sparsity: float, method: str) -> SLAConfig:
        """sla: critical = floor((1 - sparsity) * blocks) >= 1 top blocks, linear over all the rest;
        sparse-only: the same critical blocks, every other block negligible (skipped). The fractions
        are given as exact block ratios so that floor() cannot leave a stray marginal block."""
        blocks = self.key_blocks
        critical = max(1, math.floor((1.0 - sparsity) * blocks + 1e-9))
        negligible = (blocks - critical) / blocks if method == "sparse-only" else 0.0
        return SLAConfig(block_q=self.block, block_k=self.block, topk=critical / blocks, negligible=negligible,
                         feature_map=self.feature_map, backend="reference")


# What was run on this 2-core CPU: MNIST 16x16, patch 2 -> 64 tokens, blocks of 2 -> 32 key blocks per row.
SLARecipeConfig.register_preset("cpu")
# Seconds-long, for tests: 8x8 digits, patch 1 -> 64 tokens in 32 blocks, a one-block DiT.
SLARecipeConfig.register_preset("smoke", dataset="digits", dim=16, depth=1, heads=2, patch_size=1, block=2,
                                teacher_steps=4, finetune_steps=2, batch_size=8, sparsities=(0.9,), seeds=(0,),
                                classifier_steps=5, num_samples=20, sample_steps=1)


# ---------------------------------------------------------------------------------------------
# Linear-only attention (the ablation): a DiT Attention layer whose softmax is replaced
# ---------------------------------------------------------------------------------------------

class LinearOnlyAttention(Attention):
    """fewer's DiT Attention with phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K)) in place of softmax."""

    linear_config: SLAConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = linear_only_reference(self.q_norm(q), self.k_norm(k), v, self.linear_config)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


def convert_to_linear_only_(model: nn.Module, config: SLAConfig) -> list[str]:
    """Swap every DiT Attention layer of ``model`` (in place) to linear-only attention."""
    converted = []
    for name, module in model.named_modules():
        if type(module) is Attention:
            module.__class__ = LinearOnlyAttention
            module.linear_config = config
            converted.append(name)
    if not converted:
        raise ValueError("convert_to_linear_only_ found no fewer DiT Attention layer")
    return converted


def convert(denoiser: TrigFlowDenoiser, method: str, sparsity: float, cfg: SLARecipeConfig) -> TrigFlowDenoiser:
    """A converted deep copy of ``denoiser`` (the dense weights are shared by value, not by reference)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    model = copy.deepcopy(denoiser)
    if method in ("sparse-only", "sla"):
        convert_to_sla_(model, cfg.sla_config(sparsity, method))
    if method == "sparse-only":  # no linear branch: its projection (bias included) stays zero
        for p in projection_parameters(model):
            p.requires_grad_(False)
    elif method == "linear-only":
        convert_to_linear_only_(model, cfg.sla_config(sparsity, method))
    return model


# ---------------------------------------------------------------------------------------------
# Training, sampling, scoring
# ---------------------------------------------------------------------------------------------

def load_images(name: str):
    from ...data import load_digits, load_mnist
    if name == "digits":
        return load_digits()
    return load_mnist(size=16 if name == "mnist16" else 32)


def flow_matching_train(denoiser: TrigFlowDenoiser, data, steps: int, lr: float, batch_size: int, seed: int,
                        warmup_steps: int) -> list[dict[str, Any]]:
    """fewer.train with the TrigFlow loss on data; batches, noise and times are functions of (seed, step)."""
    from ...train import TrainConfig, train

    get_batch, loss_fn = flow_matching_steps(data, batch_size, seed, LogNormalTime(sigma_d=denoiser.sigma_d))

    train_cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, schedule="cosine", weight_decay=0.0,
                            grad_clip=1.0, log_every=max(1, steps // 10), seed=seed, out_dir="", progress=False,
                            device="cpu", resume="never", beta2=0.99,
                            # a non-finite update is skipped and counted (reported as skipped_updates), not fatal
                            on_nonfinite="skip", max_skipped=steps)
    denoiser.train()
    history = train(denoiser, loss_fn, get_batch, train_cfg).history
    denoiser.eval()
    return history


@torch.no_grad()
def samples_from_fixed_noise(denoiser: TrigFlowDenoiser, cfg: SLARecipeConfig, image_shape: tuple[int, ...],
                             num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples whose noise depends only on the sample index (the same for every model)."""
    labels = torch.arange(cfg.num_samples) % num_classes
    noise = randn_per_sample(per_sample_generators([100_000 + i for i in range(cfg.num_samples)]), image_shape)
    x = sample_ode(denoiser, noise, labels, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    return x.float().clamp(-1, 1), labels


def train_teacher(cfg: SLARecipeConfig, data) -> TrigFlowDenoiser:
    """The dense DiT (seed 0), cached at ``cfg.teacher_cache`` when given (keyed by the settings it depends on)."""
    key = {"dit": cfg.dit_config().to_dict(), "dataset": cfg.dataset, "steps": cfg.teacher_steps,
           "lr": cfg.teacher_lr, "batch_size": cfg.batch_size, "sigma_d": cfg.sigma_d}
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(DiT(cfg.dit_config()), sigma_d=cfg.sigma_d)
    if cfg.teacher_cache and os.path.exists(cfg.teacher_cache):
        saved = torch.load(cfg.teacher_cache, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            denoiser.load_state_dict(saved["state_dict"])
            return denoiser.eval()
    flow_matching_train(denoiser, data, cfg.teacher_steps, cfg.teacher_lr, cfg.batch_size, seed=0,
                        warmup_steps=min(50, cfg.teacher_steps // 10))
    if cfg.teacher_cache:
        Path(cfg.teacher_cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": denoiser.state_dict()}, cfg.teacher_cache)
    return denoiser.eval()


def softmax_density(model: nn.Module, method: str) -> float:
    """Computed softmax token pairs / L^2 over the SLA layers' last forward (1 dense, 0 linear-only)."""
    if method == "dense":
        return 1.0
    if method == "linear-only":
        return 0.0
    layers = sla_modules(model)
    return sum(layer.last_density() for layer in layers) / len(layers)


def run_sla_recipe(cfg: SLARecipeConfig, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (method, sparsity, seed) plus the teacher's row; see the module docstring."""
    from ...eval.image_metrics import SampleEvaluator, psnr, ssim
    from ...models.classifier import train_classifier

    if not isinstance(cfg, SLARecipeConfig):
        raise TypeError(f"run_sla_recipe expects an SLARecipeConfig, got {type(cfg).__name__}")
    data = load_images(cfg.dataset)
    image_shape = tuple(data.train_x.shape[1:])
    classifier = train_classifier(data.train_x, data.train_y, steps=cfg.classifier_steps, seed=0)
    evaluator = SampleEvaluator(classifier, data.test_x)

    start = time.perf_counter()
    teacher = train_teacher(cfg, data)
    teacher_samples, labels = samples_from_fixed_noise(teacher, cfg, image_shape, data.num_classes)

    def score(samples: torch.Tensor) -> dict[str, float]:
        nonfinite = int((~torch.isfinite(samples.flatten(1))).any(dim=1).sum())
        if nonfinite:  # a diverged model: report it instead of failing the whole table
            return {"class_accuracy": float("nan"), "frechet_distance": float("nan"), "psnr": float("nan"),
                    "ssim": float("nan"), "nonfinite_samples": nonfinite}
        quality = evaluator(samples, labels)
        return {"class_accuracy": quality["class_accuracy"], "frechet_distance": quality["frechet_distance"],
                "psnr": float(psnr(samples, teacher_samples, data_range=2.0)),
                "ssim": float(ssim(samples, teacher_samples, data_range=2.0)), "nonfinite_samples": 0}

    common = {"dataset": cfg.dataset, "tokens": cfg.dit_config().num_tokens, "key_blocks": cfg.key_blocks,
              "finetune_steps": cfg.finetune_steps, "num_samples": cfg.num_samples}
    rows = [{**common, "method": "teacher", "sparsity": 0.0, "seed": 0, "finetune_steps": 0, **score(teacher_samples),
             "final_loss": float("nan"), "skipped_updates": 0, "softmax_density": 1.0, "seconds": time.perf_counter() - start}]
    if progress:
        print(_format_row(rows[-1]), flush=True)
    for method in cfg.methods:
        for sparsity in ((0.0,) if method == "dense" else cfg.sparsities):
            for seed in cfg.seeds:
                start = time.perf_counter()
                model = convert(teacher, method, sparsity, cfg)
                history = flow_matching_train(model, data, cfg.finetune_steps, cfg.finetune_lr, cfg.batch_size,
                                              seed=1 + seed, warmup_steps=min(10, cfg.finetune_steps // 10))
                samples, _ = samples_from_fixed_noise(model, cfg, image_shape, data.num_classes)
                rows.append({**common, "method": method, "sparsity": sparsity, "seed": seed, **score(samples),
                             "final_loss": float(history[-1]["loss"]) if history else float("nan"),
                             "skipped_updates": int(history[-1].get("skipped", 0)) if history else 0,
                             "softmax_density": softmax_density(model, method),
                             "seconds": time.perf_counter() - start})
                if progress:
                    print(_format_row(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds per (dataset, method, sparsity), over finite values only
    (``failed_runs`` counts runs with non-finite samples); std is 0 for one value."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["sparsity"]), []).append(row)
    table = []
    for (dataset, method, sparsity), members in groups.items():
        out: dict[str, Any] = {"dataset": dataset, "method": method, "sparsity": sparsity, "seeds": len(members),
                               "finetune_steps": members[0]["finetune_steps"]}
        # a run whose samples are not finite (diverged) is counted, and left out of the means
        out["failed_runs"] = sum(1 for m in members if m.get("nonfinite_samples", 0))
        for metric in METRICS:
            values = [float(m[metric]) for m in members if math.isfinite(float(m[metric]))]
            out[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(out)
    return table


def _format_row(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """CSV with the environment columns of fewer.bench appended."""
    from ...bench import environment

    env = environment()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys([c for row in rows for c in row] + list(env)))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})
    return path


def print_summary(table: list[dict[str, Any]]) -> None:
    print(f"{'method':<12} {'sparsity':>8} {'n':>2} {'class acc':>15} {'Frechet':>15} {'PSNR dB':>15} "
          f"{'SSIM':>15} {'density':>7}")
    for r in table:
        cells = [f"{r[f'{m}_mean']:.3f}+-{r[f'{m}_std']:.3f}" for m in ("class_accuracy", "frechet_distance",
                                                                        "psnr", "ssim")]
        print(f"{r['method']:<12} {r['sparsity']:>8.2f} {r['seeds']:>2} " + " ".join(f"{c:>15}" for c in cells)
              + f" {r['softmax_density_mean']:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=SLARecipeConfig.presets())
    parser.add_argument("--teacher-cache", default="")
    parser.add_argument("--out", default="benchmarks/results/cpu/sla_recipe",
                        help="writes <out>.csv (summary) and <out>_runs.csv (every run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="", help="comma-separated subset of the preset's methods")
    parser.add_argument("--sparsities", default="", help="comma-separated subset of the preset's sparsities")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"teacher_cache": args.teacher_cache}
    if args.methods:
        overrides["methods"] = tuple(args.methods.split(","))
    if args.sparsities:
        overrides["sparsities"] = tuple(float(v) for v in args.sparsities.split(","))
    cfg = SLARecipeConfig.from_preset(args.preset, **overrides)
    print(cfg.to_json())
    rows = run_sla_recipe(cfg)
    table = summarize(rows)
    write_rows(rows, f"{args.out}_runs.csv")
    print("wrote", write_rows(table, f"{args.out}.csv"))
    print_summary(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

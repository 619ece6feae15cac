"""Sage attention end to end: trained tiny LLaMA perplexity and tiny DiT samples, exact vs sage attention.

    PYTHONPATH=. python3 benchmarks/attention/sage_end_to_end.py [--lm-steps 400] [--digits-steps 600] [--out DIR]

Trains fewer's tiny LLaMA on Shakespeare and the tiny class-conditional DiT on the embedded digits (the
``cpu`` baseline presets, more LM steps), then evaluates both with every attention call in bf16 autocast,
once with exact attention (torch SDPA) and once per sage preset (``use_backend("sage")``; on CPU the
PyTorch twin, which emulates the kernel's INT8/FP8 numerics and is the kernel's oracle). The two runs share
weights, inputs and noise, so the differences are the attention's alone:

- LLaMA: validation perplexity over the whole held-out split (fp32 and bf16-exact for reference);
- DiT: samples from the same noise and labels; PSNR and SSIM of sage samples against the exact ones,
  and the foundation's class accuracy and Frechet distance of each set.

Writes ``benchmarks/results/cpu/sage_end_to_end.csv`` (or ``<gpu>`` on CUDA).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

from fewer import bench
from fewer.attention import use_backend
from fewer.attention.sage import SageConfig
from fewer.baselines import DigitsBaselineConfig, LMBaselineConfig, run_lm_baseline
from fewer.baselines.digits import conditional_samples, load_dataset, train_digit_denoiser
from fewer.baselines.lm import evaluate_lm
from fewer.data import load_corpus
from fewer.eval.image_metrics import psnr, sample_quality, ssim
from fewer.models.classifier import train_classifier

# (label, attention backend, sage config): exact attention first, it is the yardstick
VARIANTS = [
    ("exact", "torch", None),
    ("sage2", "sage", SageConfig.from_preset("sage2")),
    ("sage2pp", "sage", SageConfig.from_preset("sage2pp")),
    ("sage2_no_k_smoothing", "sage", SageConfig(smooth_k=False)),
    ("sage2_no_v_smoothing", "sage", SageConfig(smooth_v=False)),
]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def language_model(steps: int, device: torch.device, rows: list[dict]) -> None:
    cfg = LMBaselineConfig.from_preset("cpu", steps=steps, device=device.type)
    start = time.perf_counter()
    result = run_lm_baseline(cfg, progress=False)
    print(f"LLaMA trained: {steps} steps, {result.params:,} parameters, {time.perf_counter() - start:.0f}s", flush=True)
    corpus = load_corpus(cfg.corpus)
    model = result.model.to(device)
    fp32 = evaluate_lm(model, corpus.val, cfg.seq_len, cfg.batch_size, None, device)
    rows.append(dict(part="llama", variant="fp32_exact", val_loss=fp32["val_loss"], val_ppl=fp32["val_ppl"]))
    for label, backend, config in VARIANTS:
        with _autocast(device), use_backend(backend, config):
            res = evaluate_lm(model, corpus.val, cfg.seq_len, cfg.batch_size, None, device)
        rows.append(dict(part="llama", variant=f"bf16_{label}", val_loss=res["val_loss"], val_ppl=res["val_ppl"]))
        print(rows[-1], flush=True)


def diffusion_transformer(steps: int, num_samples: int, sample_steps: int, device: torch.device,
                          rows: list[dict]) -> None:
    cfg = DigitsBaselineConfig.from_preset("cpu", steps=steps, num_samples=num_samples, sample_steps=sample_steps,
                                           device=device.type)
    data = load_dataset(cfg.dataset)
    classifier = train_classifier(data.train_x, data.train_y, steps=cfg.classifier_steps, seed=cfg.seed)
    start = time.perf_counter()
    denoiser, _ = train_digit_denoiser(cfg, data, progress=False)
    print(f"DiT trained: {steps} steps, {time.perf_counter() - start:.0f}s", flush=True)
    denoiser = denoiser.to(device)
    reference = None
    for label, backend, config in VARIANTS:
        with _autocast(device), use_backend(backend, config):
            samples, labels = conditional_samples(denoiser, num_samples, data.num_classes, data.image_shape,
                                                  sample_steps, cfg.guidance_scale, seed=10_000, device=device)
        quality = sample_quality(classifier, data.test_x, samples, labels)
        row = dict(part="dit", variant=f"bf16_{label}", class_accuracy=quality["class_accuracy"],
                   frechet_distance=quality["frechet_distance"])
        if reference is None:
            reference = samples
        else:
            row["psnr_vs_exact_db"] = float(psnr(samples, reference, data_range=2.0))
            row["ssim_vs_exact"] = float(ssim(samples, reference, data_range=2.0))
        rows.append(row)
        print(row, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--digits-steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--sample-steps", type=int, default=24)
    parser.add_argument("--out", default=None, help="also copy the CSV here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows: list[dict] = []
    language_model(args.lm_steps, device, rows)
    diffusion_transformer(args.digits_steps, args.samples, args.sample_steps, device, rows)
    rows = [dict(row, lm_steps=args.lm_steps, digits_steps=args.digits_steps, samples=args.samples,
                 sample_steps=args.sample_steps) for row in rows]
    path = bench.write_csv(rows, "attention", "sage_end_to_end")
    print("wrote", path)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(path, args.out)
    bench.print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

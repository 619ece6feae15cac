"""Tour part: the foundation baselines (LLaMA on Shakespeare, class-conditional DiT on digits)."""

from __future__ import annotations

ORDER = 10
TITLE = "Baselines: a LLaMA learns Shakespeare, a DiT learns digits"


def _curve(ax, history, key, label):
    rows = [r for r in history if r.get(key) is not None and r.get("kind", "train") in ("train", "eval")]
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)


def run(ctx) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...baselines import DigitsBaselineConfig, LMBaselineConfig, run_digits_baseline, run_lm_baseline

    preset = "gpu" if ctx.on_gpu else "cpu"
    lm_cfg = LMBaselineConfig.from_preset(preset, seed=ctx.seed)
    lm = run_lm_baseline(lm_cfg, progress=False)
    digits_cfg = DigitsBaselineConfig.from_preset(preset, seed=ctx.seed)
    digits = run_digits_baseline(digits_cfg, progress=False)
    ctx.results["baselines"] = {"lm": {"val_loss": lm.val_loss, "val_ppl": lm.val_ppl}, "digits": digits.metrics}

    ctx.add(f"LLaMA preset `{lm_cfg.model}` ({lm.params / 1e6:.2f}M parameters), {lm_cfg.steps} steps of "
            f"{lm_cfg.batch_size}x{lm_cfg.seq_len} tokens on Shakespeare (BPE 4096, 3 held-out plays). "
            f"DiT preset `{digits_cfg.model}` on `{digits_cfg.dataset}`, {digits_cfg.steps} steps, TrigFlow "
            f"flow matching; {digits_cfg.num_samples} class-conditional samples with {digits_cfg.sample_steps} Heun "
            f"steps and guidance {digits_cfg.guidance_scale}. Reproduce: `fewer train lm --preset {preset}` and "
            f"`fewer train digits --preset {preset}`.")
    m = digits.metrics
    ctx.add_table([
        {"model": "LLaMA (text)", "metric": "validation loss / perplexity",
         "value": f"{lm.val_loss:.3f} / {lm.val_ppl:.1f}", "reference": f"uniform over vocab: ppl {4096}"},
        {"model": "DiT (digits)", "metric": "class accuracy of samples", "value": f"{m['class_accuracy']:.3f}",
         "reference": f"real test images: {m['classifier_test_accuracy']:.3f}"},
        {"model": "DiT (digits)", "metric": "Frechet distance (classifier features)",
         "value": f"{m['frechet_distance']:.3f}", "reference": f"real train vs test: {m['real_frechet_distance']:.3f}"},
        {"model": "DiT (digits)", "metric": "precision / recall", "value": f"{m['precision']:.3f} / {m['recall']:.3f}",
         "reference": "1 / 1 for real images"},
    ], title="Baseline quality")

    def median_of(history, key):
        values = sorted(r[key] for r in history if r.get("kind") == "train" and r.get(key))
        return values[len(values) // 2] if values else float("nan")

    ctx.add_table([
        {"what": "LLaMA training", "throughput": f"{median_of(lm.history, 'tokens_per_s'):,.0f} tokens/s"},
        {"what": "DiT training", "throughput": f"{median_of(digits.history, 'samples_per_s'):,.0f} images/s"},
        {"what": f"DiT sampling ({2 * digits_cfg.sample_steps - 1} network calls per image)",
         "throughput": f"{digits_cfg.num_samples / m['sample_seconds']:,.1f} images/s"},
    ], title=f"Speed on {ctx.device.type} (median over logged steps)")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    _curve(axes[0], [r for r in lm.history if r.get("kind") == "train"], "loss", "train")
    _curve(axes[0], [r for r in lm.history if r.get("kind") == "eval"], "val_loss", "validation")
    axes[0].set(title="LLaMA on Shakespeare", xlabel="step", ylabel="cross-entropy")
    axes[0].legend()
    _curve(axes[1], [r for r in digits.history if r.get("kind") == "train"], "loss", "train")
    axes[1].set(title="DiT flow-matching loss", xlabel="step", ylabel="loss", yscale="log")
    ctx.add_figure(fig, "baselines_curves", "Training curves of the two baselines")

    per_class = 8
    grid = digits.samples.view(-1, *digits.samples.shape[1:])
    picks = [grid[digits.labels == c][:per_class] for c in range(10)]
    fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.7, 10 * 0.7))
    for c in range(10):
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(picks[c]):
                ax.imshow(picks[c][j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    ctx.add_figure(fig, "baselines_samples", "Class-conditional DiT samples, one row per digit 0-9")

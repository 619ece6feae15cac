"""Baselines that prove the foundation: the LLaMA model learns Shakespeare, the DiT learns the digits.

Every later method starts from these: a quantized or sparse variant is compared with the dense
baseline trained by the same loop on the same data, and diffusion methods reuse the digit
classifier's metrics (accuracy of class-conditional samples, Frechet distance of its features).
"""

from .digits import DigitsBaselineConfig, DigitsBaselineResult, run_digits_baseline, train_digit_denoiser
from .lm import LMBaselineConfig, LMBaselineResult, evaluate_lm, run_lm_baseline

__all__ = ["DigitsBaselineConfig", "DigitsBaselineResult", "LMBaselineConfig", "LMBaselineResult",
           "evaluate_lm", "run_digits_baseline", "run_lm_baseline", "train_digit_denoiser"]

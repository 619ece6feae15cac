"""Tiny single-file reference models, each driven by a Config dataclass.

- ``Llama`` / ``LlamaConfig``: LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, GQA).
- ``DiT`` / ``DiTConfig``: diffusion transformer for images [N, C, H, W] and video [N, C, T, H, W].
- ``TrigFlowDenoiser``, ``trigflow_loss``, ``sample_ode``: the denoiser contract joining networks,
  losses and samplers (TrigFlow parameterisation).
- ``DigitClassifier`` / ``train_classifier``: the feature extractor behind ``fewer.eval`` metrics.

Attention in every model goes through ``fewer.attention.sdpa``; every projection is an nn.Linear.
"""

from .classifier import DigitClassifier, train_classifier
from .denoiser import (LogNormalTime, TrigFlowDenoiser, UniformTime, noise_from_velocity, noisy_sample, sample,
                       sample_ode, time_grid, trigflow_loss, velocity_target, x0_from_velocity)
from .dit import DiT, DiTConfig
from .llama import KVCache, Llama, LlamaConfig

__all__ = [
    "DigitClassifier", "train_classifier",
    "LogNormalTime", "TrigFlowDenoiser", "UniformTime", "noise_from_velocity", "noisy_sample", "sample",
    "sample_ode", "time_grid", "trigflow_loss", "velocity_target", "x0_from_velocity",
    "DiT", "DiTConfig",
    "KVCache", "Llama", "LlamaConfig",
]

"""fewer: cheaper large generative models. Fewer bits, fewer FLOPs, fewer sampling steps.

The stable public surface is listed in ``__all__``; everything else may change. Subpackages load on
first use (``fewer.formats``, ``fewer.models``, ...), so ``import fewer`` stays light and works
without triton, a GPU or the optional extras.
"""

import importlib

from . import attention, core
from .core import ConfigError, seed_everything

__version__ = "0.1.0"

_SUBPACKAGES = ("baselines", "data", "distill", "eval", "formats", "fqt", "models", "nn", "train")

__all__ = ["__version__", "attention", "core", "ConfigError", "seed_everything", "convert_for_training", *_SUBPACKAGES]


def __getattr__(name):
    if name == "convert_for_training":  # fully-quantized training (fewer/fqt), loaded on first use
        return importlib.import_module(".fqt", __name__).convert_for_training
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fewer' has no attribute {name!r}")

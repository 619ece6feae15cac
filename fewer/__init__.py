"""fewer: cheaper large generative models. Fewer bits, fewer FLOPs, fewer sampling steps.

The stable public surface is listed in ``__all__``; everything else may change.
"""

from . import attention, core
from .core import ConfigError, seed_everything

__version__ = "0.1.0"

__all__ = ["__version__", "attention", "core", "ConfigError", "seed_everything"]

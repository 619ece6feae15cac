"""Attention: one entry point, ``sdpa``, with torch's signature plus ``backend=`` and ``config=``.

Backends: torch's own (``torch``, ``math``, ``flash``, ``efficient``, ``cudnn``), the float32
``reference``, and fewer's methods (``sage``, ``sla``, ``jvp``), which register themselves from
their subpackages. ``patch_sdpa`` routes a model's ``F.scaled_dot_product_attention`` calls to a
backend; ``register_transformers`` adds one as a Hugging Face attention implementation.
"""

from .dispatch import (Backend, available_backends, reference_attention, register_backend, sdpa,
                       use_backend)
from .patch import apply_patch, patch_sdpa, register_transformers

__all__ = ["Backend", "apply_patch", "available_backends", "patch_sdpa", "reference_attention",
           "register_backend", "register_transformers", "sdpa", "use_backend"]

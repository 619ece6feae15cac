"""Attention: one entry point, ``sdpa``, with torch's signature plus ``backend=`` and ``config=``."""

from .dispatch import (Backend, available_backends, reference_attention, register_backend, sdpa,
                       use_backend)

__all__ = ["Backend", "available_backends", "reference_attention", "register_backend", "sdpa", "use_backend"]

"""Optional dependencies: import them lazily, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {
    "triton": "triton",
    "tokenizers": "data",
    "sklearn": "data",
    "matplotlib": "report",
    "transformers": "hf",
    "safetensors": "test",
}


class MissingDependency(ImportError):
    """An optional dependency is missing; the message says which extra installs it."""


def require(module: str, *, purpose: str = "") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRA_OF.get(top, "all")
        why = f" for {purpose}" if purpose else ""
        raise MissingDependency(
            f"{top} is needed{why} but is not installed: pip install 'fewer[{extra}]' (or pip install {top})"
        ) from exc

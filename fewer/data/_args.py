"""Argument checks shared by the loaders: a clear ValueError naming the argument and what is allowed."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int if it is an integer >= ``low`` (bools are refused), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name}={value!r} is not allowed: expected {kind}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")
    return value

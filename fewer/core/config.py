"""The config base every method uses: frozen, keyword-only dataclasses that validate themselves.

A config describes; a function applies it. Configs hold no tensors or devices, so they serialize to
plain JSON (``to_dict`` / ``from_dict``) and travel into run folders and benchmark CSVs unchanged.

    @dataclass(frozen=True, kw_only=True)
    class MyConfig(Config):
        block: int = 64
        mode: str = "fast"

        def validate(self):
            check_positive_int(self, "block")
            check_choice(self, "mode", ("fast", "exact"))

    MyConfig.register_preset("tiny", block=16)
    MyConfig.from_preset("tiny", mode="exact")
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, Iterable, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed. Subclasses ValueError."""


def _error(cfg: Any, field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{type(cfg).__name__}.{field}={value!r} is not allowed: {allowed}")


def check_choice(cfg: Any, field: str, choices: Iterable[Any]) -> None:
    value = getattr(cfg, field)
    choices = tuple(choices)
    if value not in choices:
        raise _error(cfg, field, value, "choose one of " + ", ".join(repr(c) for c in choices))


def check_range(cfg: Any, field: str, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _error(cfg, field, value, "expected a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise _error(cfg, field, value, f"expected a value in {interval}")


def check_positive_int(cfg: Any, field: str, *, multiple_of: int | None = None) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _error(cfg, field, value, "expected a positive integer")
    if multiple_of is not None and value % multiple_of:
        raise _error(cfg, field, value, f"expected a multiple of {multiple_of}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every fewer config. Subclasses override ``validate`` and may register presets."""

    _presets: ClassVar[dict[str, dict[str, Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._presets = {}  # each class owns its presets; subclasses do not inherit the parent's

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the field, the value and what is allowed."""

    # ---- type checks from annotations (only the simple cases; validate() covers the rest) ----
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            expected = hints.get(f.name)
            value = getattr(self, f.name)
            if expected is bool and not isinstance(value, bool):
                raise _error(self, f.name, value, "expected True or False")
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise _error(self, f.name, value, "expected an integer")
            if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _error(self, f.name, value, "expected a number")
            if expected is str and not isinstance(value, str):
                raise _error(self, f.name, value, "expected a string")

    # ---- serialization ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Config) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _coerce(hints.get(key), value)
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    # ---- presets ----
    @classmethod
    def register_preset(cls, name: str, **overrides: Any) -> None:
        cls(**overrides)  # validate now, so a bad preset fails at definition time
        cls._presets[name] = dict(overrides)

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(cls._presets)

    @classmethod
    def from_preset(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in cls._presets:
            raise ConfigError(f"{cls.__name__} has no preset {name!r}; presets: {cls.presets()}")
        return cls(**{**cls._presets[name], **overrides})


def _coerce(annotation: Any, value: Any) -> Any:
    """JSON gives lists and dicts back; turn them into tuples and nested configs as annotated."""
    if isinstance(annotation, type) and issubclass(annotation, Config) and isinstance(value, dict):
        return annotation.from_dict(value)
    origin = typing.get_origin(annotation)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(annotation)
        inner = args[0] if args else None
        return tuple(_coerce(inner, v) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if arg is type(None) and value is None:
                return None
            if isinstance(arg, type) and issubclass(arg, Config) and isinstance(value, dict):
                return arg.from_dict(value)
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return _coerce(arg, value)
    return value

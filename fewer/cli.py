"""``fewer <command>``: each command lives in the module that owns it.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``. Flags for a config
dataclass are generated from its fields with ``add_config_arguments`` so that the config stays the
single source of truth; ``--dry-run`` style printing is ``config.to_json()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
import typing
from typing import Any

# command -> (module, one-line help). A module that does not exist yet is simply not offered.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fewer.info", "versions, devices, and which backends can run here (with reasons)"),
    "data": ("fewer.data.cli", "prepare or inspect the offline datasets"),
    "train": ("fewer.baselines.cli", "train a foundation baseline: LLaMA on Shakespeare (lm) or a DiT on digits (digits)"),
    "distill": ("fewer.distill.cli", "few-step distillation (sCM, rCM, DMD) on the 2-D toy or digits: fewer distill toy|digits"),
    "tour": ("fewer.report.tour", "run what fewer can do on the embedded data and write a report"),
}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, prefix: str = "") -> None:
    """Add one ``--field`` flag per dataclass field (defaults None: unset flags keep the config's)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name.startswith("_"):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        kind = hints.get(f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            parser.add_argument(flag, dest=prefix + f.name, default=None,
                                type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                                metavar="BOOL", help=f"(default {default})")
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=prefix + f.name, default=None, type=kind, help=f"(default {default!r})")
        else:
            parser.add_argument(flag, dest=prefix + f.name, default=None, type=json.loads,
                                metavar="JSON", help=f"(default {default!r}, given as JSON)")


def config_from_args(config_cls: type, args: argparse.Namespace, base: Any = None, prefix: str = "") -> Any:
    """Build a config from ``base`` (or the defaults) with every flag the user set."""
    changes = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            changes[f.name] = value
    if base is None:
        return config_cls.from_dict(changes)
    return config_cls.from_dict({**base.to_dict(), **changes})


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package does not exist (yet)
        return False


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if _module_exists(spec[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewer", description="fewer: cheaper large generative models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log which backends are resolved")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _available_commands().items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

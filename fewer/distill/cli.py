"""``fewer distill toy|digits``: few-step distillation experiments (sCM, rCM, DMD-only) with a results table.

    fewer distill toy --preset cpu --out benchmarks/results/cpu             # all methods, 3 seeds
    fewer distill toy --preset cpu --methods rcm --seeds 1 --lam-sweep 0.01,0.1,1
    fewer distill digits --preset cpu --out benchmarks/results/cpu
    fewer distill digits --preset gpu --dry-run                             # print the config
    fewer distill speed --out benchmarks/results/cpu                        # sampling wall-clock table
    fewer distill ablate --seeds 2 --out benchmarks/results/cpu             # sCM switches on the toy

``--method`` is an alias of ``--methods``. Presets: cpu (what runs here in minutes), gpu (larger, not run).
"""

from __future__ import annotations

import argparse
import json

from ..cli import add_config_arguments, config_from_args
from .recipe import RecipeConfig, run_recipe

PRESETS = {"toy": {"cpu": "toy-cpu", "gpu": "gpu"}, "digits": {"cpu": "digits-cpu", "gpu": "digits-gpu"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="testbed_cmd", metavar="TESTBED", required=True)
    sp = sub.add_parser("speed", help="sampling wall-clock: teacher 50-step CFG ODE vs 1/2/4-step students")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--num-samples", type=int, default=500)
    sp.add_argument("--out", default="", help="folder for distill_speed.csv")
    ab = sub.add_parser("ablate", help="sCM switches (warm-up, normalisation, weighting, discrete) on the toy")
    ab.add_argument("--preset", default="cpu", choices=("cpu",))
    ab.add_argument("--out", default="", help="folder for distill_toy_scm_ablation*.csv")
    add_config_arguments(ab, RecipeConfig)
    for name in PRESETS:
        p = sub.add_parser(name, help=f"distil on the {name} testbed")
        p.add_argument("--preset", default="cpu", choices=sorted(PRESETS[name]), help="cpu (default) or gpu")
        p.add_argument("--method", dest="methods", default=None, choices=("scm", "rcm", "dmd", "all"))
        p.add_argument("--out", default="", help="folder for the CSVs and samples")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        add_config_arguments(p, RecipeConfig)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(summary: list[dict]) -> str:
    cols: list[str] = []
    for r in summary:
        cols += [c for c in r if c not in cols and not c.endswith("_std")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = []
        for c in cols:
            v = r.get(c, "")
            std = r.get(c + "_std")
            cells.append(_fmt(v) + (f" ± {std:.2g}" if isinstance(std, float) and std > 0 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.testbed_cmd == "speed":
        from pathlib import Path

        from .recipe import speed_table, write_csv
        rows = speed_table(repeats=args.repeats, num_samples=args.num_samples)
        print(format_table(rows))
        if args.out:
            write_csv(rows, Path(args.out) / "distill_speed.csv")
        return 0
    if args.testbed_cmd == "ablate":
        from pathlib import Path

        from .recipe import _summarise, toy_scm_ablation, write_csv
        cfg = config_from_args(RecipeConfig, args, base=RecipeConfig.from_preset("toy-cpu"))
        rows = toy_scm_ablation(cfg)
        summary = _summarise(rows, ("variant", "steps"), ["precision", "modes_covered", "energy", "paired_l2",
                                                          "nonfinite"])
        print(format_table(summary))
        if args.out:
            write_csv(rows, Path(args.out) / "distill_toy_scm_ablation_runs.csv")
            write_csv(summary, Path(args.out) / "distill_toy_scm_ablation.csv")
        return 0
    base = RecipeConfig.from_preset(PRESETS[args.testbed_cmd][args.preset])
    cfg = config_from_args(RecipeConfig, args, base=base)
    if cfg.testbed != args.testbed_cmd:
        cfg = cfg.replace(testbed=args.testbed_cmd)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    result = run_recipe(cfg, args.out)
    print(format_table(result["summary"]))
    if result["sweep"]:
        print("\nlambda sweep (seed 0):")
        print(format_table(result["sweep"]))
    if args.out:
        print(json.dumps({"out": args.out}))
    return 0

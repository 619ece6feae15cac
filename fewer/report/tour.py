"""``fewer tour``: run what the library can do on the embedded data and write a report.

The report is ``<out>/README.md`` plus PNG plots beside it. Each part of the tour is a module in
``fewer.report.sections`` (ORDER, TITLE, run(ctx)). On CPU the tour uses small shapes and should
finish in about five minutes; on a GPU it picks larger shapes (``ctx.scale``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.deps import require
from . import sections as _sections


@dataclass
class TourContext:
    out_dir: Path
    device: torch.device
    scale: str                       # "cpu" (small shapes) or "gpu" (larger shapes)
    seed: int = 0
    only: tuple[str, ...] = ()
    markdown: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def add(self, text: str) -> None:
        self.markdown.append(text.rstrip() + "\n")

    def add_table(self, rows: Sequence[dict[str, Any]], title: str | None = None) -> None:
        self.add(markdown_table(rows, title))

    def add_figure(self, fig: Any, name: str, caption: str) -> Path:
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt
        plt.close(fig)
        self.add(f"![{caption}]({path.name})\n\n*{caption}*")
        return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def discover_sections() -> list[Any]:
    modules = []
    for info in pkgutil.iter_modules(_sections.__path__):
        modules.append(importlib.import_module(f"{_sections.__name__}.{info.name}"))
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def run_tour(out_dir: Path, device: str | None = None, only: Sequence[str] = (), seed: int = 0) -> Path:
    require("matplotlib", purpose="the tour's plots").use("Agg")  # headless; a clear error names the extra
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = TourContext(out_dir=out_dir, device=dev, scale="gpu" if dev.type == "cuda" else "cpu", seed=seed,
                      only=tuple(only))
    from ..info import collect
    info = collect()
    ctx.add("# fewer tour\n")
    ctx.add(f"Device: {info['devices'][-1]}; torch {info['versions']['torch']}; "
            f"triton {info['versions']['triton']}; scale: {ctx.scale}.\n")
    timings = []
    for module in discover_sections():
        name = module.__name__.rsplit(".", 1)[-1]
        if only and name not in only:
            continue
        title = getattr(module, "TITLE", name)
        ctx.add(f"\n## {title}\n")
        start = time.perf_counter()
        status = "ok"
        try:
            module.run(ctx)
        except Exception as exc:  # one failing part must not hide the others; the report says so
            status = f"failed: {type(exc).__name__}: {exc}"
            ctx.add(f"**This part failed:** `{type(exc).__name__}: {exc}`\n\n```\n{traceback.format_exc()}\n```")
        seconds = time.perf_counter() - start
        timings.append({"part": title, "seconds": round(seconds, 1), "status": status})
        print(f"[tour] {title}: {status} ({seconds:.1f}s)", flush=True)
    ctx.add("\n## Time per part\n")
    ctx.add_table(timings)
    report = out_dir / "README.md"
    report.write_text("\n".join(ctx.markdown))
    failed = [t for t in timings if t["status"] != "ok"]
    if failed:
        raise SystemExit(f"tour finished with {len(failed)} failed part(s); see {report}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/tour", help="report folder (default reports/tour)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--only", nargs="*", default=(), help="run only these parts (module names)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    report = run_tour(Path(args.out), args.device, args.only, args.seed)
    print(f"report written to {report}")
    return 0

"""OsciReset: snap oscillating master weights to their quantized value (TetraJet-v2; notes section 3).

Per weight element, over a window of ``window`` optimizer steps after a snapshot,

    R(w) = sum_t |Q(w_t) - Q(w_{t-1})| / sum_t |w_t - w_{t-1}|      (0 where the denominator is 0)

with Q the layer's forward weight quantizer (RTN, recomputed each step, so scale changes count). At the
end of the window every weight with R >= ``threshold`` gets w <- Q(w) (Adam moments untouched; in
OutControl layers only the FP4 columns). Snapshots fall on steps s >= start with (s - offset) % period
== 0 (steps = completed updates, 1-based; start = ``start_step`` or ceil(start_fraction * total_steps));
the decision is made after update s + window. ``reset=False`` measures without resetting.

Diagnostics per window and layer (``history``): the fraction of weights with R >= 4 / 8 / 16 and >=
threshold, the aggregate ratio sum|dQ| / sum|dw|, the flip rate (share of quantized values that change
per step), the fraction reset, and quantiles of R over weights that moved; ``last_reset_step`` logs the
timing of the last reset (the notes' toy gained only when it fell about 50 steps before the end).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .linear import QuantLinear
from .recipe import OsciResetConfig


def oscillation_ratio(sum_dq: torch.Tensor, sum_dw: torch.Tensor) -> torch.Tensor:
    """sum|dQ| / sum|dw| per element, 0 where the weight did not move."""
    return torch.where(sum_dw > 0, sum_dq / torch.where(sum_dw > 0, sum_dw, torch.ones_like(sum_dw)),
                       torch.zeros_like(sum_dq))


class _Track:
    def __init__(self, w: torch.Tensor, q: torch.Tensor):
        self.w_prev, self.q_prev = w.clone(), q.clone()
        self.sum_dq = torch.zeros_like(w)
        self.sum_dw = torch.zeros_like(w)
        self.flips = 0
        self.steps = 0


class OsciReset:
    """Runs the windows, decisions and resets for a model's QuantLinear layers."""

    def __init__(self, layers: dict[str, QuantLinear], cfg: OsciResetConfig, total_steps: Optional[int] = None,
                 keep_ratios: bool = False):
        if cfg.start_step == 0 and cfg.start_fraction > 0 and total_steps is None:
            raise ValueError("OsciReset with start_fraction needs total_steps (or set start_step)")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps <= 0):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        for name, layer in layers.items():
            if not layer.recipe.w.quantized:
                raise ValueError(f"OsciReset: layer {name!r} does not quantize its forward weight")
        self.layers, self.cfg, self.total_steps = layers, cfg, total_steps
        self.start = cfg.start_step if cfg.start_step > 0 else math.ceil(cfg.start_fraction * (total_steps or 0))
        self.keep_ratios = keep_ratios
        self.tracks: dict[str, _Track] = {}
        self.snapshot_step: Optional[int] = None
        self.last_reset_step: Optional[int] = None
        self.history: list[dict] = []
        self.ratios: dict[str, torch.Tensor] = {}

    # ---- schedule ----
    def is_snapshot_step(self, step: int) -> bool:
        if step < self.start or (step - self.cfg.offset) % self.cfg.period:
            return False
        return self.total_steps is None or step + self.cfg.window <= self.total_steps

    def decision_steps(self) -> list[int]:
        """Every step after which a decision (and reset) happens in a run of total_steps."""
        if self.total_steps is None:
            raise ValueError("decision_steps needs total_steps")
        return [s + self.cfg.window for s in range(0, self.total_steps + 1) if self.is_snapshot_step(s)]

    # ---- per step ----
    def begin(self) -> None:
        """Call once before the first update (a snapshot at step 0 if the schedule has one)."""
        if self.is_snapshot_step(0):
            self._snapshot(0)

    @torch.no_grad()
    def after_step(self, step: int) -> Optional[dict]:
        """Call after optimizer update ``step`` completes; returns the decision's summary on a decision step."""
        summary = None
        if self.snapshot_step is not None and self.snapshot_step < step <= self.snapshot_step + self.cfg.window:
            self._accumulate()
            if step == self.snapshot_step + self.cfg.window:
                summary = self._decide(step)
        if self.snapshot_step is None and self.is_snapshot_step(step):
            self._snapshot(step)
        return summary

    def _snapshot(self, step: int) -> None:
        self.snapshot_step = step
        self.tracks = {}
        for name, layer in self.layers.items():
            w = layer.full_weight()
            self.tracks[name] = _Track(w, layer.quantized_weight(w))

    def _accumulate(self) -> None:
        for name, layer in self.layers.items():
            tr = self.tracks[name]
            w = layer.full_weight()
            q = layer.quantized_weight(w)
            tr.sum_dq += (q - tr.q_prev).abs()
            tr.sum_dw += (w - tr.w_prev).abs()
            tr.flips += int((q != tr.q_prev).sum())
            tr.steps += 1
            tr.w_prev, tr.q_prev = w, q

    def _decide(self, step: int) -> dict:
        thr = self.cfg.threshold
        summary = {"step": step, "snapshot": self.snapshot_step, "reset": self.cfg.reset, "layers": {}}
        total_reset = total = 0
        for name, layer in self.layers.items():
            tr = self.tracks[name]
            ratio = oscillation_ratio(tr.sum_dq, tr.sum_dw)
            mask = ratio >= thr
            if layer.outcontrol_selected:
                mask[:, layer.fp8_channels] = False
            n = ratio.numel()
            moved = ratio[tr.sum_dw > 0]
            qs = (torch.quantile(moved, torch.tensor([0.5, 0.9, 0.99])).tolist() if moved.numel() else [0.0] * 3)
            row = {"frac_ge4": float((ratio >= 4).sum()) / n, "frac_ge8": float((ratio >= 8).sum()) / n,
                   "frac_ge16": float((ratio >= 16).sum()) / n, "frac_ge_threshold": float(mask.sum()) / n,
                   "aggregate_ratio": float(tr.sum_dq.sum() / tr.sum_dw.sum()) if float(tr.sum_dw.sum()) > 0 else 0.0,
                   "flip_rate": tr.flips / (n * max(1, tr.steps)),
                   "ratio_p50": qs[0], "ratio_p90": qs[1], "ratio_p99": qs[2],
                   "frac_reset": float(mask.sum()) / n if self.cfg.reset else 0.0}
            if self.cfg.reset and bool(mask.any()):
                w = layer.full_weight()
                layer.assign_weight(torch.where(mask, layer.quantized_weight(w), w))
            if self.keep_ratios:
                self.ratios[name] = ratio
            summary["layers"][name] = row
            total_reset += int(mask.sum()) if self.cfg.reset else 0
            total += n
        summary["frac_reset"] = total_reset / max(1, total)
        if self.cfg.reset:
            self.last_reset_step = step
        self.history.append(summary)
        self.tracks = {}
        self.snapshot_step = None
        return summary

    def state(self) -> dict:
        return {"start": self.start, "last_reset_step": self.last_reset_step, "windows": len(self.history),
                "steps_before_end": (None if self.total_steps is None or self.last_reset_step is None
                                     else self.total_steps - self.last_reset_step)}

"""FQTController: the per-step work of a quantized-training recipe (OutControl, OsciReset, counters).

    report = convert_for_training(model, "tetrajet_v2_full")
    ctrl = FQTController(report, total_steps=cfg.steps)
    train(model, loss_fn, get_batch, cfg, callbacks=[ctrl])      # or ctrl.after_step(step) by hand
    ctrl.report()   # OutControl selection, OsciReset history and last reset step, non-finite counts

TetraJet-v2 calls its channel recording and OsciReset right after each optimizer step; so does this
controller (the training loop's callbacks run after each update, with ``state.step`` = updates done).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .convert import ConversionReport, quant_layers
from .oscireset import OsciReset
from .outcontrol import OutControl
from .recipe import OsciResetConfig


class FQTController:
    def __init__(self, model_or_report: nn.Module | ConversionReport, total_steps: Optional[int] = None, *,
                 step: int = 0, oscireset: Optional[OsciResetConfig] = None, keep_ratios: bool = False):
        """``oscireset`` overrides the recipe's (e.g. ``OsciResetConfig(enabled=True, reset=False)`` to
        measure oscillation in an arm without OsciReset)."""
        if isinstance(model_or_report, ConversionReport):
            layers = dict(model_or_report.converted)
        else:
            layers = quant_layers(model_or_report)
        if not layers:
            raise ValueError("FQTController: no QuantLinear layers (run convert_for_training first)")
        recipes = {l.recipe for l in layers.values()}
        if len(recipes) != 1:
            raise ValueError("FQTController: the layers use different recipes")
        self.recipe = recipes.pop()
        self.layers = layers
        self.step = step
        self.outcontrol = OutControl(layers, self.recipe.outcontrol, step) if self.recipe.outcontrol.enabled else None
        osc = self.recipe.oscireset if oscireset is None else oscireset
        self.oscireset = OsciReset(layers, osc, total_steps, keep_ratios) if osc.enabled else None
        if self.oscireset is not None and step == 0:
            self.oscireset.begin()

    def after_step(self, step: int) -> None:
        self.step = step
        if self.outcontrol is not None:
            self.outcontrol.after_step(step)
        if self.oscireset is not None:
            self.oscireset.after_step(step)

    def __call__(self, state: Any) -> None:
        """The training loop's callback: ``state.step`` = updates done."""
        self.after_step(int(state.step))

    def nonfinite(self) -> dict[str, dict[str, int]]:
        return {n: {"forward": l.fqt_stats.nonfinite_forward, "backward": l.fqt_stats.nonfinite_backward}
                for n, l in self.layers.items()
                if l.fqt_stats.nonfinite_forward or l.fqt_stats.nonfinite_backward}

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recipe": self.recipe.label, "step": self.step, "layers": len(self.layers),
                               "nonfinite": self.nonfinite(),
                               "calls": {n: l.fqt_stats.calls for n, l in self.layers.items()}}
        if self.outcontrol is not None:
            out["outcontrol"] = self.outcontrol.state()
        if self.oscireset is not None:
            out["oscireset"] = {**self.oscireset.state(), "history": self.oscireset.history}
        return out

"""OutControl: static outlier-channel retention in MXFP8 (TetraJet-v2; notes section 4).

During ``record_iters`` optimizer steps from ``record_start`` (steps are counted 1, 2, ... as updates
complete; released defaults 501 and 50), every QuantLinear adds, on each training forward call, the L2
norm over tokens of each input channel of X to ``layer.channel_norm_sum``. When the window ends the
top ``k`` channels (k from :func:`n_outlier_channels`) become ``layer.fp8_channels`` once and for all
(summed across ranks first under torch.distributed, so every rank picks the same set; ties go to the
lower channel index). From the next step on, QuantLinear computes those channels of X and W in MXFP8
in the forward and the weight-gradient GEMMs, and dX stays in the recipe's format (linear.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .linear import QuantLinear
from .recipe import OutControlConfig


def n_outlier_channels(in_features: int, cfg: OutControlConfig) -> int:
    """round(ratio * in_features) rounded to a multiple of ``granularity``, at least one multiple and
    leaving at least one multiple in the FP4 part."""
    g = cfg.granularity
    k = int(round(cfg.ratio * in_features / g)) * g
    k = max(g, k)
    k = min(k, (in_features // g - 1) * g)
    if k <= 0:
        raise ValueError(f"OutControl: in_features={in_features} is too small for granularity {g}")
    return k


def select_channels(norm_sum: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted ascending) of the k largest entries; ties broken toward the lower index."""
    if norm_sum.dim() != 1:
        raise ValueError(f"norm_sum must be 1-D (one entry per input channel), got shape {tuple(norm_sum.shape)}")
    if not 0 < k < norm_sum.numel():
        raise ValueError(f"k={k} must be in [1, {norm_sum.numel() - 1}]")
    order = torch.argsort(norm_sum.float().cpu(), descending=True, stable=True)
    return torch.sort(order[:k]).values.to(norm_sum.device)


def energy_share(x: torch.Tensor, channels: torch.Tensor) -> float:
    """||X[:, channels]||^2 / ||X||^2 over the last dim (a diagnostic of how much the outliers carry)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    total = float((x2 * x2).sum())
    return float((x2[:, channels] ** 2).sum()) / total if total > 0 else 0.0


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two index sets (static vs current top-k)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


class OutControl:
    """Schedules the recording window and the one-time selection for a model's QuantLinear layers."""

    def __init__(self, layers: dict[str, QuantLinear], cfg: OutControlConfig, step: int = 0):
        """``step``: updates already done (0 for a fresh run; a resumed run with channels loaded keeps them)."""
        self.layers, self.cfg = layers, cfg
        done = bool(layers) and all(layer.outcontrol_selected for layer in layers.values())
        self.selected_at: int | None = step if done else None
        self._set_recording(next_step=step + 1)

    @property
    def window(self) -> range:
        return range(self.cfg.record_start, self.cfg.record_start + self.cfg.record_iters)

    def _set_recording(self, next_step: int) -> None:
        on = self.selected_at is None and next_step in self.window
        for layer in self.layers.values():
            layer.outcontrol_recording = on

    def after_step(self, step: int) -> None:
        """Call after optimizer update ``step`` (1-based) completes."""
        if self.selected_at is None and step == self.window[-1]:
            self.select(step)
        self._set_recording(step + 1)

    @torch.no_grad()
    def select(self, step: int | None = None) -> dict[str, torch.Tensor]:
        chosen = {}
        for name, layer in self.layers.items():
            sums = layer.channel_norm_sum
            if dist.is_available() and dist.is_initialized():
                sums = sums.clone()
                dist.all_reduce(sums)
            k = n_outlier_channels(layer.in_features, self.cfg)
            layer.fp8_channels = select_channels(sums, k)
            layer.outcontrol_recording = False
            chosen[name] = layer.fp8_channels
        self.selected_at = step
        return chosen

    def state(self) -> dict:
        return {"selected_at": self.selected_at,
                "channels": {n: int(l.fp8_channels.numel()) for n, l in self.layers.items()}}

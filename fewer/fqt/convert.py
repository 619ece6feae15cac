"""convert_for_training(model, recipe): swap nn.Linear modules for QuantLinear in place.

    report = convert_for_training(model, "tetrajet_v2")
    print(report.summary())            # what was converted, what was kept and why

Layers stay nn.Linear when their qualified name matches one of ``recipe.keep_bf16`` (fnmatch
patterns; default the LM head), when they sit in the last ``ceil(recipe.bf16_last_fraction * n)`` of
the model's transformer blocks (the nn.ModuleList holding the most linear layers), or, with
``recipe.unaligned == "keep_bf16"``, when their sizes do not suit the recipe's blocks (with
``"error"``, the default, such a layer raises a ValueError naming it). Converted layers share the
original Parameter objects, so an optimizer built before the conversion still updates them, and the
model's state_dict keys do not change.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import torch
from torch import nn

from .linear import QuantLinear, check_features, layer_seed
from .recipe import Recipe, get_recipe


@dataclasses.dataclass
class ConversionReport:
    recipe: Recipe
    converted: dict[str, QuantLinear]
    kept: dict[str, str]                     # name -> why it stays nn.Linear
    blocks: str = ""                         # the ModuleList used for bf16_last_fraction

    def summary(self) -> str:
        lines = [f"recipe {self.recipe.label}: {len(self.converted)} linear layers quantized, {len(self.kept)} kept"]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per converted layer: training calls and non-finite counts."""
        return {name: dataclasses.asdict(layer.fqt_stats) for name, layer in self.converted.items()}

    def nonfinite_total(self) -> int:
        return sum(l.fqt_stats.nonfinite_forward + l.fqt_stats.nonfinite_backward for l in self.converted.values())


def _transformer_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """The ModuleList with the most nn.Linear descendants, and its children's qualified names."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = name, count
    if best is None:
        return "", []
    blocks = model.get_submodule(best)
    return best, [f"{best}.{i}" if best else str(i) for i in range(len(blocks))]


def convert_for_training(model: nn.Module, recipe: Recipe | str, **overrides: Any) -> ConversionReport:
    """Replace the model's nn.Linear layers by QuantLinear as ``recipe`` says (in place); returns a report."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert_for_training expects an nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe, **overrides)
    list_name, blocks = _transformer_blocks(model)
    n_bf16 = math.ceil(recipe.bf16_last_fraction * len(blocks) - 1e-9) if blocks else 0
    bf16_blocks = blocks[len(blocks) - n_bf16:] if n_bf16 else []
    converted: dict[str, QuantLinear] = {}
    kept: dict[str, str] = {}
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    plan: list[tuple[str, nn.Linear]] = []
    for name, module in targets:
        pattern = next((p for p in recipe.keep_bf16 if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            kept[name] = f"matches keep_bf16 pattern {pattern!r}"
            continue
        block = next((b for b in bf16_blocks if name.startswith(b + ".")), None)
        if block is not None:
            kept[name] = f"in block {block}, one of the last {n_bf16} of {len(blocks)} (bf16_last_fraction)"
            continue
        reason = check_features(recipe, module.in_features, module.out_features, name)
        if reason is not None:
            if recipe.unaligned == "error":
                raise ValueError(reason)
            kept[name] = reason
            continue
        plan.append((name, module))
    # every check passed: now swap (a failing conversion leaves the model untouched)
    for index, (name, module) in enumerate(plan):
        new = QuantLinear.from_linear(module, recipe, fqt_seed=layer_seed(recipe.seed, index), name=name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        converted[name] = new
    return ConversionReport(recipe=recipe, converted=converted, kept=kept, blocks=list_name)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def fqt_state_dict(model: nn.Module) -> dict[str, Any]:
    """The quantized layers' own state (OutControl channels and norms, call counters), for checkpoints."""
    out = {}
    for name, layer in quant_layers(model).items():
        out[name] = {"fp8_channels": layer.fp8_channels.cpu(), "channel_norm_sum": layer.channel_norm_sum.cpu(),
                     "stats": dataclasses.asdict(layer.fqt_stats)}
    return out


def load_fqt_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    layers = quant_layers(model)
    missing = sorted(set(state) - set(layers))
    if missing:
        raise ValueError(f"fqt state names layers the model does not have as QuantLinear: {missing}")
    for name, entry in state.items():
        layer = layers[name]
        layer.fp8_channels = entry["fp8_channels"].to(layer.weight.device, torch.long)
        layer.channel_norm_sum = entry["channel_norm_sum"].to(layer.weight.device, torch.float32)
        for key, value in entry["stats"].items():
            setattr(layer.fqt_stats, key, int(value))

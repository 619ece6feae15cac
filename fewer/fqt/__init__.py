"""Fully-quantized training: the quantized linear layer, recipes (bf16, naive NVFP4, NVIDIA, TetraJet-v2),
OutControl and OsciReset. See README.md.

    from fewer.fqt import convert_for_training, FQTController
    report = convert_for_training(model, "tetrajet_v2_full")
    ctrl = FQTController(report, total_steps=steps)      # a train() callback
"""

from .controller import FQTController
from .convert import ConversionReport, convert_for_training, fqt_state_dict, load_fqt_state_dict, quant_layers
from .linear import FQTStats, QuantLinear, QuantLinearFunction, call_seed, hadamard_signs, layer_seed, quantize_operand
from .oscireset import OsciReset, oscillation_ratio
from .outcontrol import OutControl, energy_share, jaccard, n_outlier_channels, select_channels
from .recipe import (GEMMS, PRESETS, ROLES, OsciResetConfig, OutControlConfig, Recipe, RoleConfig, describe_presets,
                     get_recipe)

__all__ = [
    "Recipe", "RoleConfig", "OutControlConfig", "OsciResetConfig", "PRESETS", "ROLES", "GEMMS", "get_recipe",
    "describe_presets",
    "QuantLinear", "QuantLinearFunction", "FQTStats", "quantize_operand", "call_seed", "layer_seed", "hadamard_signs",
    "convert_for_training", "ConversionReport", "quant_layers", "fqt_state_dict", "load_fqt_state_dict",
    "FQTController", "OutControl", "n_outlier_channels", "select_channels", "energy_share", "jaccard",
    "OsciReset", "oscillation_ratio",
]

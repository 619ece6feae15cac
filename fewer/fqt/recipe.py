"""Quantized-training recipes: how each of the six GEMM operands of a linear layer is quantized.

A linear layer y = x W^T + b runs three GEMMs, each with two operands quantized along that GEMM's
reduction dimension (shapes: X [T, K], W [N, K], dY [T, N]; notes = ../shared/research/nvfp4_training.md):

=============  ==========================  ======================  ========================
role           GEMM                        operand                 blocks along
=============  ==========================  ======================  ========================
``x``          Y  = X W^T  (forward)       X                       K (in_features)
``w``          Y  = X W^T  (forward)       W                       K
``dy_dgrad``   dX = dY W   (data grad)     dY                      N (out_features)
``w_dgrad``    dX = dY W   (data grad)     W (used as W^T)         N
``dy_wgrad``   dW = dY^T X (weight grad)   dY (used as dY^T)       T (tokens)
``x_wgrad``    dW = dY^T X (weight grad)   X (used as X^T)         T
=============  ==========================  ======================  ========================

(TetraJet-v2's quantizer numbers 1..6 in this order; notes section 2.1.)

A :class:`RoleConfig` says how one operand is quantized; a :class:`Recipe` holds the six roles, which
layers stay unquantized, the random Hadamard transform's sign policy, the SR seed, and the
OutControl / OsciReset settings. Named presets (:data:`PRESETS`, ``Recipe.from_preset(name)``):

* ``bf16``: no quantization (each layer is exactly ``nn.Linear``).
* ``nvfp4_naive``: NVFP4 (1x16 E4M3 + per-tensor FP32) with RTN on all six operands, the backward
  operands re-quantized from the unquantized X and W, no Hadamard (notes section 8.4, arm b).
* ``nvidia_nvfp4``: NVIDIA's pretraining recipe (arXiv 2509.25149; Transformer Engine's
  ``NVFP4BlockScaling``; notes sections 2.1 table, 1.5 and 6): X 1x16 RTN; W 16x16 tiles RTN, so the
  dgrad operand is the same quantized W transposed; dY SR (no Hadamard for dgrad); the wgrad GEMM
  with a 16-point random Hadamard transform on dY^T (SR) and on X^T re-quantized from the unquantized X
  with RTN; one fixed sign vector for the whole run; per-tensor FP32 second level; E4M3 block scales
  rounded to nearest (TE). The last 15 % of the transformer blocks (rounded up) and the LM head stay
  unquantized ("about 15-16 % of linear layers in BF16, mostly the final blocks", notes section 6).
* ``tetrajet_v2``: TetraJet-v2's unbiased double-block quantization (arXiv 2510.27527; notes sections
  2.1, 1.2, 1.4): all six operands NVFP4 with 1x16 E4M3 inner scales and an FP32 scale per 1x128 outer
  block; RTN forward; on all four backward operands a 16-point random Hadamard transform (fresh signs
  per forward call, the same signs for both operands of a GEMM) and stochastic rounding; the backward
  X and W are the *forward-quantized* values, dequantized, transposed, rotated and re-quantized.
  Embeddings and the LM head stay unquantized, every block linear is quantized ("fully FP4").
  Departure from the released code, on purpose: the block scales of the SR operands are rounded *up*
  to E4M3 (``scale_rounding="up"``), which is what makes SR unbiased as the paper claims; the released
  code rounds them to nearest (a ``truncation_free_scale`` TODO), which clips about half the block
  maxima and biases them by about -1.2 % (notes section 1.4). ``tetrajet_v2_released`` keeps the
  released nearest rounding.
* ``tetrajet_v2_outcontrol``: ``tetrajet_v2`` + OutControl (notes section 4): the top 10 % of input
  channels by L2 norm accumulated over steps 501-550 computed in MXFP8 in the forward and wgrad GEMMs.
* ``tetrajet_v2_oscireset``: ``tetrajet_v2`` + OsciReset (notes section 3): window 50, threshold 8
  (the released YAMLs; the class default there is 16), period 200, from 60 % of training.
* ``tetrajet_v2_full``: both.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..core import Config, ConfigError, check_choice, check_positive_int, check_range

ROLES = ("x", "w", "dy_dgrad", "w_dgrad", "dy_wgrad", "x_wgrad")
# the two operands of each GEMM, in product order
GEMMS = {"fprop": ("x", "w"), "dgrad": ("dy_dgrad", "w_dgrad"), "wgrad": ("dy_wgrad", "x_wgrad")}
FORMATS = ("bf16", "nvfp4", "nvfp4_2d", "nvfp4_double", "mxfp8", "mxfp8_e5m2", "mxfp4", "fp8_e4m3_block",
           "fp8_e5m2_block")
NVFP4_FORMATS = ("nvfp4", "nvfp4_2d", "nvfp4_double")
HEADROOM_1716 = 17.0 / 16.0
HADAMARD_BLOCK = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleConfig(Config):
    """How one GEMM operand is quantized (always along that GEMM's reduction dimension).

    format: ``bf16`` (not quantized: the value is used as it is), ``nvfp4`` (E2M1, 1x16 E4M3 scales, an
      FP32 second level), ``mxfp8`` / ``mxfp8_e5m2`` / ``mxfp4`` (OCP MX, 1x32 E8M0 scales),
      ``fp8_e4m3_block`` / ``fp8_e5m2_block`` (1x128 FP32 scales). ``nvfp4_2d`` is shorthand for
      ``nvfp4`` with ``block="16x16"``, ``nvfp4_double`` for ``nvfp4`` with ``second_level="outer128"``.
    block: ``1x16`` (NVFP4 blocks of 16 along the reduction dim) or ``16x16`` (NVFP4 weight tiles, so
      Q(W)^T = Q(W^T)); MX and FP8 formats have their own fixed 1-D block ("1d").
    second_level: NVFP4's FP32 scale, ``tensor`` (NVIDIA) or ``outer128`` (one per 1x128 block along the
      reduction dim, TetraJet-v2).
    rounding: ``nearest`` (RTN, ties to even) or ``stochastic`` (SR, seeded per layer and call).
    hadamard: a 16-point random Hadamard transform along the reduction dim before quantizing; both
      operands of a GEMM must agree (the same signs cancel in the product).
    scale_rounding: E4M3 block scales ``nearest`` or ``up`` (nothing clips, so SR is unbiased); MX scales
      ``floor`` (OCP) or ``up``; ``None`` = the format's default (nearest / floor).
    headroom: 1.0 or 17/16 (Quartet II: the block max is mapped to 6 * 16/17 before the scale is rounded
      to nearest, so nothing clips). Only these two values are implemented by fewer.formats.
    source: for ``w_dgrad`` and ``x_wgrad``: ``master`` re-quantizes the unquantized X / W (NVIDIA,
      naive), ``forward`` re-quantizes the dequantized forward-quantized X / W (TetraJet-v2's aligned
      double quantization, "dequant -> transpose -> RHT -> requant").
    """

    format: str = "bf16"
    block: str = "1d"
    second_level: str = "tensor"
    rounding: str = "nearest"
    hadamard: bool = False
    scale_rounding: Optional[str] = None
    headroom: float = 1.0
    source: str = "master"

    def __post_init__(self) -> None:
        # shorthands -> the canonical (format, block, second_level) triple
        if self.format == "nvfp4_2d":
            if self.block not in ("1d", "16x16"):
                raise ConfigError(f"RoleConfig.format='nvfp4_2d' means 16x16 blocks; block={self.block!r} "
                                  "contradicts it")
            object.__setattr__(self, "format", "nvfp4")
            object.__setattr__(self, "block", "16x16")
        elif self.format == "nvfp4_double":
            if self.second_level not in ("tensor", "outer128") or self.block == "16x16":
                raise ConfigError("RoleConfig.format='nvfp4_double' means 1x16 blocks with a 1x128 FP32 second level; "
                                  f"got block={self.block!r}, second_level={self.second_level!r}")
            object.__setattr__(self, "format", "nvfp4")
            object.__setattr__(self, "second_level", "outer128")
        if self.format == "nvfp4" and self.block == "1d":
            object.__setattr__(self, "block", "1x16")
        super().__post_init__()

    def validate(self) -> None:
        check_choice(self, "format", FORMATS)
        check_choice(self, "rounding", ("nearest", "stochastic"))
        check_choice(self, "source", ("master", "forward"))
        check_choice(self, "second_level", ("tensor", "outer128"))
        check_range(self, "headroom", 1.0, None)
        if self.headroom not in (1.0, HEADROOM_1716):
            raise ConfigError(f"RoleConfig.headroom={self.headroom!r} is not allowed: fewer.formats implements 1.0 "
                              f"(none) and 17/16={HEADROOM_1716} (Quartet II)")
        if self.format == "bf16":
            if self.rounding != "nearest" or self.headroom != 1.0 or self.scale_rounding is not None:
                raise ConfigError("RoleConfig with format='bf16' quantizes nothing: rounding, scale_rounding and "
                                  "headroom do not apply (leave them at their defaults)")
            return
        if self.format == "nvfp4":
            check_choice(self, "block", ("1x16", "16x16"))
            if self.block == "16x16" and self.second_level != "tensor":
                raise ConfigError("RoleConfig: 16x16 NVFP4 tiles go with the per-tensor second level "
                                  "(second_level='tensor'), not 'outer128'")
            if self.scale_rounding is not None:
                check_choice(self, "scale_rounding", ("nearest", "up"))
            if self.headroom != 1.0 and self.scale_rounding == "up":
                raise ConfigError("RoleConfig: headroom=17/16 and scale_rounding='up' both prevent clipping; "
                                  "choose one")
        else:
            if self.block != "1d":
                raise ConfigError(f"RoleConfig.block={self.block!r} is not allowed for format {self.format!r}: "
                                  "its block is fixed ('1d': 1x32 for MX, 1x128 for FP8 block formats)")
            if self.second_level != "tensor":
                raise ConfigError(f"RoleConfig.second_level applies to NVFP4 only, not {self.format!r}")
            if self.headroom != 1.0:
                raise ConfigError(f"RoleConfig.headroom applies to NVFP4 only, not {self.format!r}")
            allowed = ("floor", "up") if self.format.startswith("mx") else ("exact",)
            if self.scale_rounding is not None:
                check_choice(self, "scale_rounding", allowed)

    # ---- what fewer.formats needs ----
    @property
    def quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def spec_name(self) -> str:
        """The fewer.formats spec that implements this role."""
        if self.format == "nvfp4":
            if self.block == "16x16":
                return "nvfp4_2d"
            return "nvfp4_double" if self.second_level == "outer128" else "nvfp4"
        return self.format

    @property
    def formats_scale_rounding(self) -> Optional[str]:
        if self.headroom != 1.0:
            return "headroom"
        return self.scale_rounding

    @property
    def block_multiple(self) -> int:
        """The reduction-dim size must be a multiple of this (block, outer block, Hadamard block)."""
        if not self.quantized:
            return HADAMARD_BLOCK if self.hadamard else 1
        if self.format == "nvfp4":
            return 128 if self.second_level == "outer128" else 16
        if self.format.startswith("mx"):
            return 32
        return 128


BF16 = RoleConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutControlConfig(Config):
    """OutControl's static outlier-channel retention (TetraJet-v2; notes section 4).

    Over ``record_iters`` optimizer steps starting at step ``record_start`` (1-based; released: 501 and
    50), every quantized layer sums, per input channel, the L2 norm of X over the tokens of each forward
    call. After the window, the ``ratio`` share of channels with the largest sums (released: 0.10; the
    class default there is 0.02) is selected once and for all; from then on those channels of X and W
    run in ``fp8_format`` (MXFP8) in the forward and the weight-gradient GEMMs (no Hadamard there),
    the others in the recipe's formats; dX stays fully in the recipe's format. The number of channels
    is round(ratio * in_features) rounded to a multiple of ``granularity`` (at least one multiple):
    the released kernel uses 128, its accuracy runs were simulated with round(ratio * C); the
    default 32 (one MXFP8 block) keeps small layers close to the ratio.
    """

    enabled: bool = False
    ratio: float = 0.10
    record_start: int = 501
    record_iters: int = 50
    granularity: int = 32
    fp8_format: str = "mxfp8"
    fp8_rounding: str = "nearest"

    def validate(self) -> None:
        check_range(self, "ratio", 0.0, 1.0, low_open=True, high_open=True)
        check_positive_int(self, "record_start")
        check_positive_int(self, "record_iters")
        check_positive_int(self, "granularity", multiple_of=32)
        check_choice(self, "fp8_format", ("mxfp8", "mxfp8_e5m2"))
        check_choice(self, "fp8_rounding", ("nearest", "stochastic"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OsciResetConfig(Config):
    """OsciReset (TetraJet-v2; notes section 3).

    Every ``period`` optimizer steps from the start (``start_step`` if > 0, else ``start_fraction`` of the
    run's total steps), snapshot the weights; over the next ``window`` steps accumulate, per weight,
    sum |Q(w_t) - Q(w_{t-1})| and sum |w_t - w_{t-1}| (Q = the forward weight quantizer, recomputed, so
    scale changes count); then every weight whose ratio is >= ``threshold`` has its master value set to
    Q(w). Snapshots fall on steps s with (s - offset) % period == 0. ``reset=False`` measures only
    (the ratio distribution and flip rate for arms without OsciReset). Released: window 50, threshold 8,
    period 200 (400 at 370M), start at 59-69 % of training, the last reset about 50 steps before the end.
    """

    enabled: bool = False
    reset: bool = True
    window: int = 50
    threshold: float = 8.0
    period: int = 200
    start_fraction: float = 0.6
    start_step: int = 0
    offset: int = 0

    def validate(self) -> None:
        check_positive_int(self, "window")
        check_positive_int(self, "period")
        check_range(self, "threshold", 1.0, None)
        check_range(self, "start_fraction", 0.0, 1.0)
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ConfigError(f"OsciResetConfig.start_step={self.start_step!r} is not allowed: expected an integer "
                              ">= 0 (0 = use start_fraction)")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or not 0 <= self.offset < self.period:
            raise ConfigError(f"OsciResetConfig.offset={self.offset!r} is not allowed: expected an integer in "
                              f"[0, period={self.period})")
        if self.window >= self.period:
            raise ConfigError(f"OsciResetConfig.window={self.window} is not allowed: expected less than "
                              f"period={self.period} (one detection window per period)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe(Config):
    """Six roles + which layers stay unquantized + Hadamard signs + SR seed + OutControl / OsciReset.

    keep_bf16: fnmatch patterns of qualified module names left as nn.Linear (default: the LM head).
    bf16_last_fraction: the last ceil(fraction * n_blocks) transformer blocks stay unquantized.
    hadamard_signs: ``per_call`` (fresh signs per forward call, TetraJet-v2) or ``fixed`` (one sign
      vector for the whole run and every layer, NVIDIA).
    unaligned: a layer whose in/out features are not a multiple of what its roles need: ``error``
      (ValueError naming the layer) or ``keep_bf16`` (left as nn.Linear, listed in the report).
    seed: the root of every SR stream and Hadamard sign vector (per layer, per call, per role).
    backend: the quantizers: ``torch`` (the fewer.formats reference), ``triton`` (the fused kernels of
      fewer.formats: CUDA, or CPU under TRITON_INTERPRET=1; the same values bit for bit), ``auto``
      (triton on CUDA tensors when Triton can run, else torch).
    """

    label: str = "custom"
    x: RoleConfig = BF16
    w: RoleConfig = BF16
    dy_dgrad: RoleConfig = BF16
    w_dgrad: RoleConfig = BF16
    dy_wgrad: RoleConfig = BF16
    x_wgrad: RoleConfig = BF16
    keep_bf16: tuple[str, ...] = ("lm_head",)
    bf16_last_fraction: float = 0.0
    hadamard_signs: str = "per_call"
    unaligned: str = "error"
    seed: int = 0
    backend: str = "auto"
    outcontrol: OutControlConfig = OutControlConfig()
    oscireset: OsciResetConfig = OsciResetConfig()

    def validate(self) -> None:
        for role in ROLES:
            if not isinstance(getattr(self, role), RoleConfig):
                raise ConfigError(f"Recipe.{role} must be a RoleConfig, got {type(getattr(self, role)).__name__}")
        if not isinstance(self.outcontrol, OutControlConfig):
            raise ConfigError("Recipe.outcontrol must be an OutControlConfig")
        if not isinstance(self.oscireset, OsciResetConfig):
            raise ConfigError("Recipe.oscireset must be an OsciResetConfig")
        if not isinstance(self.keep_bf16, tuple) or not all(isinstance(p, str) for p in self.keep_bf16):
            raise ConfigError(f"Recipe.keep_bf16={self.keep_bf16!r} is not allowed: expected a tuple of strings "
                              "(fnmatch patterns of module names)")
        check_range(self, "bf16_last_fraction", 0.0, 1.0)
        check_choice(self, "hadamard_signs", ("per_call", "fixed"))
        check_choice(self, "unaligned", ("error", "keep_bf16"))
        check_choice(self, "backend", ("auto", "torch", "triton"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"Recipe.seed={self.seed!r} is not allowed: expected an integer >= 0")
        for gemm, (a, b) in GEMMS.items():
            ra, rb = getattr(self, a), getattr(self, b)
            if ra.hadamard != rb.hadamard:
                raise ConfigError(f"Recipe: the {gemm} GEMM's operands {a} and {b} must both use the Hadamard "
                                  f"transform or neither (got {ra.hadamard} and {rb.hadamard}); the same signs on "
                                  "both cancel in the product, one alone changes it")
        for role in ("x", "w", "dy_dgrad", "dy_wgrad"):
            if getattr(self, role).source != "master":
                raise ConfigError(f"Recipe.{role}.source applies only to w_dgrad and x_wgrad")
        for role, fwd in (("w_dgrad", "w"), ("x_wgrad", "x")):
            if getattr(self, role).source == "forward" and not getattr(self, fwd).quantized:
                raise ConfigError(f"Recipe.{role}.source='forward' needs a quantized forward operand "
                                  f"{fwd} (it re-quantizes Q({fwd})), but {fwd}.format='bf16'")
        if self.outcontrol.enabled:
            if not (self.x.quantized and self.w.quantized):
                raise ConfigError("Recipe.outcontrol needs quantized forward operands x and w")
        if self.oscireset.enabled and not self.w.quantized:
            raise ConfigError("Recipe.oscireset needs a quantized forward weight (w.format != 'bf16')")

    @property
    def quantizes(self) -> bool:
        return any(getattr(self, r).quantized for r in ROLES) or any(getattr(self, r).hadamard for r in ROLES)

    def roles(self) -> dict[str, RoleConfig]:
        return {r: getattr(self, r) for r in ROLES}

    def with_roles(self, roles: tuple[str, ...] | str = ROLES, **changes) -> "Recipe":
        """A copy with ``changes`` applied to the given roles.

        Example: ``r.with_roles(("dy_dgrad",), rounding="nearest")``.
        """
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ConfigError(f"unknown role(s) {unknown}; roles: {ROLES}")
        return self.replace(**{r: getattr(self, r).replace(**changes) for r in roles})

    def feature_multiple(self, which: str) -> int:
        """What in_features ('in') or out_features ('out') must be a multiple of under this recipe."""
        # in_features is the reduction dim of fprop (x, w); out_features that of dgrad (dy, w)
        roles = ("x", "w") if which == "in" else ("dy_dgrad", "w_dgrad")
        m = 1
        for r in roles:
            m = max(m, getattr(self, r).block_multiple)
        # 16x16 tiles on W need both dims multiples of 16
        for r in ("w", "w_dgrad"):
            if getattr(self, r).block == "16x16":
                m = max(m, 16)
        return m


# ---------------------------------------------------------------------------------------------
# presets

def _nvfp4(**kw) -> RoleConfig:
    return RoleConfig(format="nvfp4", **kw)


_NAIVE = dict(x=_nvfp4(), w=_nvfp4(), dy_dgrad=_nvfp4(), w_dgrad=_nvfp4(), dy_wgrad=_nvfp4(), x_wgrad=_nvfp4())

_NVIDIA = dict(
    x=_nvfp4(), w=_nvfp4(block="16x16"),
    dy_dgrad=_nvfp4(rounding="stochastic"), w_dgrad=_nvfp4(block="16x16"),
    dy_wgrad=_nvfp4(rounding="stochastic", hadamard=True), x_wgrad=_nvfp4(hadamard=True),
    hadamard_signs="fixed", bf16_last_fraction=0.15)

_TJ_FWD = dict(second_level="outer128")
_TJ_BWD = dict(second_level="outer128", rounding="stochastic", hadamard=True, scale_rounding="up")
_TETRAJET = dict(
    x=_nvfp4(**_TJ_FWD), w=_nvfp4(**_TJ_FWD),
    dy_dgrad=_nvfp4(**_TJ_BWD), w_dgrad=_nvfp4(**_TJ_BWD, source="forward"),
    dy_wgrad=_nvfp4(**_TJ_BWD), x_wgrad=_nvfp4(**_TJ_BWD, source="forward"),
    hadamard_signs="per_call")
_TETRAJET_RELEASED = {k: (v.replace(scale_rounding="nearest")
                          if isinstance(v, RoleConfig) and v.rounding == "stochastic" else v)
                      for k, v in _TETRAJET.items()}
_OUTCONTROL = OutControlConfig(enabled=True)
_OSCIRESET = OsciResetConfig(enabled=True)

PRESETS = ("bf16", "nvfp4_naive", "nvidia_nvfp4", "tetrajet_v2", "tetrajet_v2_released", "tetrajet_v2_outcontrol",
           "tetrajet_v2_oscireset", "tetrajet_v2_full")

Recipe.register_preset("bf16", label="bf16")
Recipe.register_preset("nvfp4_naive", label="nvfp4_naive", **_NAIVE)
Recipe.register_preset("nvidia_nvfp4", label="nvidia_nvfp4", **_NVIDIA)
Recipe.register_preset("tetrajet_v2", label="tetrajet_v2", **_TETRAJET)
Recipe.register_preset("tetrajet_v2_released", label="tetrajet_v2_released", **_TETRAJET_RELEASED)
Recipe.register_preset("tetrajet_v2_outcontrol", label="tetrajet_v2_outcontrol", **_TETRAJET, outcontrol=_OUTCONTROL)
Recipe.register_preset("tetrajet_v2_oscireset", label="tetrajet_v2_oscireset", **_TETRAJET, oscireset=_OSCIRESET)
Recipe.register_preset("tetrajet_v2_full", label="tetrajet_v2_full", **_TETRAJET, outcontrol=_OUTCONTROL,
                       oscireset=_OSCIRESET)


def get_recipe(recipe: "Recipe | str", **overrides) -> Recipe:
    """A Recipe from a preset name (with field overrides) or a Recipe (returned, overrides applied)."""
    if isinstance(recipe, Recipe):
        return recipe.replace(**overrides) if overrides else recipe
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe must be a Recipe or a preset name, got {type(recipe).__name__}")
    if recipe not in Recipe.presets():
        raise ConfigError(f"unknown recipe preset {recipe!r}; presets: {Recipe.presets()}")
    return Recipe.from_preset(recipe, **overrides)


def describe_presets() -> list[dict]:
    """One row per preset: the operand formats in one line each (for the README and reports)."""
    rows = []
    for name in PRESETS:
        r = Recipe.from_preset(name)
        row = {"preset": name}
        for role in ROLES:
            rc = getattr(r, role)
            if not rc.quantized:
                row[role] = "bf16"
                continue
            parts = [rc.spec_name, "SR" if rc.rounding == "stochastic" else "RTN"]
            if rc.hadamard:
                parts.append("RHT16")
            if rc.scale_rounding == "up":
                parts.append("scale-up")
            if rc.headroom != 1.0:
                parts.append("17/16")
            if role in ("w_dgrad", "x_wgrad"):
                parts.append("from Q_fwd" if rc.source == "forward" else "from master")
            row[role] = " ".join(parts)
        row["bf16 layers"] = ", ".join(r.keep_bf16) + (f", last {r.bf16_last_fraction:.0%} blocks"
                                                          if r.bf16_last_fraction else "")
        row["extras"] = " + ".join(n for n, on in (("OutControl", r.outcontrol.enabled),
                                                   ("OsciReset", r.oscireset.enabled)) if on) or "-"
        rows.append(row)
    return rows

"""SageConfig: how SageAttention2/2++ quantizes Q, K, P and V, and which kernel runs it."""

from __future__ import annotations

import dataclasses

from ...core.config import Config, ConfigError, check_choice, check_positive_int

# Q/K INT8 scale groups (SageAttention2 section 3 and the official sm90 kernel's layout):
#   per_block : one Q scale per 128 tokens, one K scale per 64 tokens (SageAttention1, official Triton path);
#   per_warp  : one Q scale per 16 tokens (a Hopper warp's rows), one K scale per 128 tokens;
#   per_thread: inside each 16-token warp tile, rows r and r+8 share a scale (8 Q scales per 16 rows);
#               inside each 128-token K block, tokens with the same (row mod 8) div 2 share one (4 per block);
#   per_token : one scale per token (finer than the paper; cheap in Triton, an extra option).
GRANULARITIES = ("per_block", "per_warp", "per_thread", "per_token")

# PV accumulation on the tensor cores:
#   fp32+fp32: a fresh FP32 accumulator per KV block, then added into the FP32 output (SageAttention2's fix
#              for Hopper's FP8 MMA keeping only ~22 bits of a running accumulator);
#   fp32     : one running accumulator (the ablation; loses accuracy on sm90);
#   fp32+fp16: SageAttention2++: an FP16 accumulator per KV block (V quantized to a narrower range so the
#              block sum cannot overflow 65504), added into FP32.
PV_ACCUMULATIONS = ("fp32+fp32", "fp32", "fp32+fp16")

# P~ and V operands of the PV product:
#   fp8 : FP8 E4M3 (SageAttention2; 3 mantissa bits, ~2-3% relative rounding per element);
#   fp16: FP16 (SageAttention1's choice; 10 mantissa bits): lifts the accuracy floor where the output is made
#         only of what E4M3 rounds (zero-mean V), at half the PV tensor rate and twice V's bytes.
PV_DTYPES = ("fp8", "fp16")

KERNELS = ("auto", "triton", "torch")

FP8_E4M3_MAX = 448.0
FP16_MAX = 65504.0
# FP8 E4M3 range for P~ (static scale): P~ = exp2(s - m) <= 1 is scaled by 448 before the cast.
P_SCALE = FP8_E4M3_MAX


@dataclasses.dataclass(frozen=True, kw_only=True)
class SageConfig(Config):
    """Quantization choices of SageAttention2 (INT8 QK, FP8 PV) and the kernel that runs them.

    ``v_scale_max`` None means: 448 (the E4M3 maximum) for FP32 accumulation, and for ``fp32+fp16`` the
    largest range whose KV-block sum fits FP16: ``block_n * 448 * v_scale_max <= 65504`` (2.25 at
    ``block_n=64``, the official SageAttention2++ value).
    """

    qk_granularity: str = "per_thread"
    smooth_k: bool = True
    smooth_q: bool = False          # SageAttention2's Q smoothing; the public SA2 CUDA kernels leave it off
    smooth_v: bool = True           # subtract V's channel mean before FP8, add it back after (exact: rows of P sum to 1)
    pv_accumulation: str = "fp32+fp32"
    pv_dtype: str = "fp8"           # P~ and V in FP8 E4M3 (SA2) or FP16 (SA1-style, the accuracy option)
    v_scale_max: float | None = None
    exp2_fp16: bool = False         # P~ = exp2(.) in FP16 pairs (ex2.approx.f16x2); measured no faster on H100
    block_m: int = 64               # query rows per program (Hopper: one warpgroup of 64 rows)
    block_n: int = 128              # keys per KV block = the span of one fresh PV accumulator
    # V's FP8 scale: per channel times one factor per 128-key block (the block's own range), so the per-channel
    # part can come from a sample and V is read once for its statistics' sake; False: one scale per channel
    # over all tokens (the official kernels' choice), which needs every token's max before quantizing
    v_block_scale: bool = True
    # the K and V means (and V's per-channel scale) from at most this many evenly spaced 128-token chunks;
    # 0: from all tokens (the official mean). Any centre keeps K and V smoothing exact (softmax rows shift by a
    # constant, P's rows sum to one); the sample only decides how well the quantized values are centred.
    stats_chunks: int = 8
    kernel: str = "auto"            # auto: Triton on CUDA, the PyTorch twin on CPU

    def validate(self) -> None:
        check_choice(self, "qk_granularity", GRANULARITIES)
        check_choice(self, "pv_accumulation", PV_ACCUMULATIONS)
        check_choice(self, "pv_dtype", PV_DTYPES)
        check_choice(self, "kernel", KERNELS)
        check_choice(self, "block_m", (16, 32, 64, 128))
        check_choice(self, "block_n", (16, 32, 64, 128))
        check_positive_int(self, "block_m")
        if isinstance(self.stats_chunks, bool) or not isinstance(self.stats_chunks, int) or self.stats_chunks < 0:
            raise ConfigError(f"SageConfig.stats_chunks={self.stats_chunks!r} is not allowed: expected an int >= 0 "
                              "(0: statistics over all tokens)")
        if not isinstance(self.v_block_scale, bool):
            raise ConfigError(f"SageConfig.v_block_scale={self.v_block_scale!r} is not allowed: expected a bool")
        if not self.v_block_scale and self.stats_chunks:
            raise ConfigError(
                f"SageConfig.stats_chunks={self.stats_chunks} is not allowed with v_block_scale=False: a per-channel "
                "V scale over all tokens reads every token anyway; set stats_chunks=0 (preset 'sage2_v_global')")
        if self.v_scale_max is not None:
            if isinstance(self.v_scale_max, bool) or not isinstance(self.v_scale_max, (int, float)) \
                    or not 0.0 < self.v_scale_max <= FP8_E4M3_MAX:
                raise ConfigError(f"SageConfig.v_scale_max={self.v_scale_max!r} is not allowed: "
                                  f"expected a number in (0, {FP8_E4M3_MAX}] or None")
        if self.pv_accumulation == "fp32+fp16":
            worst = self.block_n * P_SCALE * self.resolved_v_scale_max
            if worst > FP16_MAX:
                raise ConfigError(
                    f"SageConfig.v_scale_max={self.resolved_v_scale_max!r} is not allowed with pv_accumulation="
                    f"'fp32+fp16' and block_n={self.block_n}: block_n*448*v_scale_max = {worst:g} exceeds the FP16 "
                    f"maximum 65504; use v_scale_max <= {FP16_MAX / (self.block_n * P_SCALE):.4f} or None")

    @property
    def resolved_v_scale_max(self) -> float:
        if self.v_scale_max is not None:
            return float(self.v_scale_max)
        if self.pv_accumulation == "fp32+fp16":
            return _fp16_safe_v_range(self.block_n)
        return FP8_E4M3_MAX


def _fp16_safe_v_range(block_n: int) -> float:
    """Largest V range (a multiple of 1/4, like the official 2.25) with block_n * 448 * range <= 65504."""
    quarter_steps = int(FP16_MAX / (block_n * P_SCALE) * 4)
    return quarter_steps / 4.0


# SageAttention2 as the official Hopper kernel runs it: per-thread INT8 QK with smoothed K, FP8 PV, two-level FP32.
SageConfig.register_preset("sage2")
# V scale and K/V means exactly as the official kernels: per channel over all tokens (the statistics read K and
# V in full before quantizing them; the v5 default).
SageConfig.register_preset("sage2_v_global", v_block_scale=False, stats_chunks=0)
# SageAttention2 with the paper's Q smoothing on top.
SageConfig.register_preset("sage2_smooth_q", smooth_q=True)
# SageAttention2++: FP8 PV into an FP16 accumulator per 64-key block (V range 2.25), then FP32.
SageConfig.register_preset("sage2pp", pv_accumulation="fp32+fp16", block_n=64)
# SageAttention2 with 16-bit PV (P~ and V in FP16, FP32 accumulation): the accuracy floor of SageAttention1's PV.
SageConfig.register_preset("sage2_pv16", pv_dtype="fp16")
# SageAttention1-style per-block scales (coarsest), for comparison.
SageConfig.register_preset("sage_per_block", qk_granularity="per_block")
# Finest scales: one per token.
SageConfig.register_preset("sage_per_token", qk_granularity="per_token")

DEFAULT_CONFIG = SageConfig.from_preset("sage2")

"""Quality floors and statistical thresholds for tests/formats, in one place.

SQNR floors (dB) are for round-to-nearest on a standard normal 256x512 tensor; measured values
(CPU, seed 0) sit 0.5-2 dB above each floor.
"""

SQNR_FLOOR_DB = {
    "int8_tensor": 36.0, "int8_channel": 38.0, "int8_token": 38.0, "int8_block": 36.0, "int8_block1d": 38.0,
    "fp8_e4m3_tensor": 30.0, "fp8_e4m3_channel": 30.0, "fp8_e4m3_block": 30.0,
    "fp8_e5m2_tensor": 24.0, "fp8_e5m2_channel": 24.0, "fp8_e5m2_block": 24.0,
    "nvfp4": 19.5, "nvfp4_2d": 18.0, "nvfp4_double": 19.5,
    "mxfp4": 17.5, "mxfp8": 29.0, "mxfp8_e5m2": 24.0,
}

# SR unbiasedness: |mean of N draws - x| / (std / sqrt(N)) must stay under this z-score on average
# (and a deliberately biased quantizer must exceed BIAS_DETECT_Z).
SR_DRAWS = 400
UNBIASED_MAX_MEAN_ABS_Z = 1.2        # E|z| = 0.80 for a standard normal
BIAS_DETECT_Z = 5.0

# NVFP4 with nearest-rounded E4M3 scales clips block maxima: relative bias on those elements (notes: -1.17 %)
NEAREST_SCALE_MIN_BIAS = 0.004
UNBIASED_MAX_REL_BIAS = 0.002

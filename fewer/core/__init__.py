"""Foundation shared by every method: configs, capabilities, backends, numerics, seeding."""

from .backend import AUTO, BackendUnavailable, resolve_backend
from .capability import (Capability, can_run_triton, has_cuda, has_module, has_triton, sm_at_least,
                         supports_fp8, supports_nvfp4, triton_interpreter_on)
from .config import Config, ConfigError, check_choice, check_positive_int, check_range
from .deps import MissingDependency, require
from .numerics import cos_sim, error_report, max_abs, rel_l1, rel_l2, rmse, sqnr_db
from .seed import deterministic, per_sample_generators, randn_per_sample, seed_everything

__all__ = [
    "AUTO", "BackendUnavailable", "resolve_backend",
    "Capability", "can_run_triton", "has_cuda", "has_module", "has_triton", "sm_at_least",
    "supports_fp8", "supports_nvfp4", "triton_interpreter_on",
    "Config", "ConfigError", "check_choice", "check_positive_int", "check_range",
    "MissingDependency", "require",
    "cos_sim", "error_report", "max_abs", "rel_l1", "rel_l2", "rmse", "sqnr_db",
    "deterministic", "per_sample_generators", "randn_per_sample", "seed_everything",
]

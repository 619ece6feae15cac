"""Few-step diffusion distillation: sCM, rCM (sCM + DMD regulariser) and DMD alone on TrigFlow.

See README.md in this folder. Public API:

    from fewer.distill import distill, DistillConfig, consistency_sample, RectifiedFlowTeacher
"""

from .dmd import dmd_gradient, dmd_loss, fake_score_loss, rollout
from .rcm import DistillConfig, DistillResult, distill
from .samplers import consistency_sample, per_sample_noise, t_max_for, teacher_sample
from .scm import LogVarHead, SCMConfig, normalize_tangent, scm_loss, scm_tangent
from .toy import AnalyticGMMTeacher, GaussianMixture, ToyMLP, energy_distance, ring, toy_metrics
from .trigflow import (EDMTeacher, RectifiedFlowTeacher, check_times, consistency_fn, edm_sigma, rf_time,
                       trigflow_time_from_rf, trigflow_time_from_sigma)

__all__ = ["AnalyticGMMTeacher", "DistillConfig", "DistillResult", "EDMTeacher", "GaussianMixture", "LogVarHead",
           "RectifiedFlowTeacher", "SCMConfig", "ToyMLP", "check_times", "consistency_fn", "consistency_sample",
           "distill", "dmd_gradient", "dmd_loss", "edm_sigma", "energy_distance", "fake_score_loss",
           "normalize_tangent", "per_sample_noise", "rf_time", "ring", "rollout", "scm_loss", "scm_tangent",
           "t_max_for", "teacher_sample", "toy_metrics", "trigflow_time_from_rf", "trigflow_time_from_sigma"]

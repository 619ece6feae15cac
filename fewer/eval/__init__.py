"""Evaluation metrics shared by every method: image metrics in a classifier's feature space."""

from .image_metrics import (SampleEvaluator, classifier_accuracy, extract_features, frechet_distance,
                            gaussian_window, per_class_diversity, precision_recall, predict, psnr, sample_quality,
                            ssim)

__all__ = ["SampleEvaluator", "classifier_accuracy", "extract_features", "frechet_distance", "gaussian_window",
           "per_class_diversity", "precision_recall", "predict", "psnr", "sample_quality", "ssim"]

"""Activation statistics for OBM saliency: calibration data, hooks, and the cache beside each checkpoint."""

from obim_trainer.calibration.activation_stats import ActivationRecorder, ActivationStats
from obim_trainer.calibration.data import CalibrationSet, load_calibration_texts, tokenize_calibration
from obim_trainer.calibration.stats_cache import STATS_DIRNAME, load_or_compute_stats, stats_key, stats_path

__all__ = [
    "STATS_DIRNAME",
    "ActivationRecorder",
    "ActivationStats",
    "CalibrationSet",
    "load_calibration_texts",
    "load_or_compute_stats",
    "stats_key",
    "stats_path",
    "tokenize_calibration",
]

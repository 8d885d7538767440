"""Calibration statistics — activations (OBM saliency), input Grams (RegMean), Fisher diagonals — their
calibration data, hooks, reduction across ranks, and the cache beside each checkpoint."""

from obim_trainer.calibration.activation_stats import ActivationRecorder, ActivationStats
from obim_trainer.calibration.data import CalibrationSet, load_calibration_texts, tokenize_calibration
from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.gram_stats import GramRecorder, GramStats
from obim_trainer.calibration.stats_cache import STATS_DIRNAME, load_or_compute_stats, stats_key, stats_path

__all__ = [
    "STATS_DIRNAME",
    "ActivationRecorder",
    "ActivationStats",
    "CalibrationSet",
    "FisherStats",
    "GramRecorder",
    "GramStats",
    "load_calibration_texts",
    "load_or_compute_stats",
    "stats_key",
    "stats_path",
    "tokenize_calibration",
]

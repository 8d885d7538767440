"""Per-language loss and perplexity of checkpoints and merged models."""

from obim_trainer.evaluation.data import EvalSets, load_eval_sets
from obim_trainer.evaluation.perplexity import METRIC_PREFIX, PerLanguageEvaluator, metric_names
from obim_trainer.evaluation.protocol import ModelEvaluator

__all__ = ["METRIC_PREFIX", "EvalSets", "ModelEvaluator", "PerLanguageEvaluator", "load_eval_sets", "metric_names"]

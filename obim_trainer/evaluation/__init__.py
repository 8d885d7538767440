"""Per-language evaluation of checkpoints and merged models: loss and perplexity, and lm-eval-harness tasks."""

from obim_trainer.evaluation.data import EvalSets, load_eval_sets
from obim_trainer.evaluation.lm_eval_tasks import LmEvalConfig, LmEvalEvaluator, language_metric_name, task_metric_name
from obim_trainer.evaluation.perplexity import METRIC_PREFIX, PerLanguageEvaluator, metric_names
from obim_trainer.evaluation.protocol import ModelEvaluator

__all__ = [
    "METRIC_PREFIX",
    "EvalSets",
    "LmEvalConfig",
    "LmEvalEvaluator",
    "ModelEvaluator",
    "PerLanguageEvaluator",
    "language_metric_name",
    "load_eval_sets",
    "metric_names",
    "task_metric_name",
]

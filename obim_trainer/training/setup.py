"""What the callback checks and prepares before training starts (every rank alike).

The checks fail before the first step on settings that could never merge; the data is tokenized
once, on rank 0, and sent to every rank by the callback.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import TrainingArguments

from obim_trainer.calibration import CalibrationSet
from obim_trainer.calibration.preparation import prepare_calibration
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import METRIC_PREFIX, load_eval_sets
from obim_trainer.merging import build_method
from obim_trainer.pipeline.variants import MergeVariant
from obim_trainer.settings.callback import OBIMConfig


def needs_live_stats(config: OBIMConfig) -> bool:
    """Whether some merge the callback may make scores by activations, recorded on the live model at each
    save (Grams, Fisher diagonals and the layer-by-layer merge read the saved checkpoints at merge time)."""
    variants = config.plan_candidates(config.top_k) or [MergeVariant(config.method, config.method, config.params)]
    return any(build_method(v.method, v.params, num_models=config.top_k).statistics().activations for v in variants)


def check_setup(config: OBIMConfig, args: TrainingArguments) -> None:
    """Fail before training when ``select_metric`` can never be logged by this run."""
    if config.select_metric.startswith(METRIC_PREFIX) and config.eval_data is None:
        raise ConfigError(
            f"select_metric '{config.select_metric}' comes from the OBIM evaluator, which has no eval_data; "
            "give eval_data={language: file} or select by a Trainer metric such as eval_loss"
        )
    if config.selector == "top_k" and config.select_metric.startswith("eval_") and args.eval_strategy == "no":
        raise ConfigError(
            f"select_metric '{config.select_metric}' is a Trainer evaluation metric but eval_strategy is 'no'; "
            "set eval_strategy (with eval_steps equal to save_steps) or select by an obim_<language>_loss metric"
        )


def check_select_metric(metric: str | None, metrics: Mapping[str, float]) -> bool:
    """At a save evaluated by the family of ``metric`` (the Trainer's ``eval_*`` or the evaluator's), fail
    unless the metric is there: otherwise the run trains to the end and never merges. Every rank has the
    same metrics, so every rank raises alike. True once checked (the first such save)."""
    family = [m for m in metrics if m.startswith("eval_") == metric.startswith("eval_")] if metric else []
    if not family:
        return False
    if metric not in metrics:
        raise ConfigError(
            f"select_metric '{metric}' is not among the metrics of the first evaluated save "
            f"({', '.join(sorted(metrics))}); set select_metric to one of them"
        )
    return True


def prepare_data(
    config: OBIMConfig, needs_stats: bool
) -> tuple[CalibrationSet | None, dict[str, CalibrationSet] | None]:
    """Calibration and evaluation samples, tokenized (on rank 0; the callback sends them to every rank)."""
    from transformers import AutoTokenizer

    if not (config.base_model / "config.json").is_file():
        raise ConfigError(
            f"base_model {config.base_model} has no config.json; give the folder of the model the run started from"
        )
    calibration = None
    if needs_stats:
        calibration = prepare_calibration(config, config.base_model, config.tokenizer_source)
    eval_sets = None
    if config.eval_data is not None:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_source or config.base_model)
        eval_sets = load_eval_sets(
            config.eval_data,
            tokenizer,
            max_samples=config.eval_samples,
            max_length=config.eval_max_length,
            text_field=config.eval_text_field,
        )
    return calibration, eval_sets

"""Benchmark accuracy per language with lm-eval-harness, for the same tables and logs as the loss evaluator.

Loss on held-out text says what a checkpoint forgot; the paper judges merges on benchmarks too
(Table 2: MMLU for English, C-Eval for Chinese, the Japanese LM Evaluation Harness). This adapter
runs named lm-eval tasks on a model folder and reports them under stable names, grouped by
language, so comparison tables, objectives and W&B logging take them like any other evaluator's:

* ``lmeval_<lang>_<task>_<metric>`` for each task or group named in the configuration (for a group
  such as ``mmlu`` or ``ceval-valid``, the aggregate lm-eval reports for it);
* ``lmeval_<lang>_<metric>``, the unweighted mean of the language's task scores — the value that
  stands for the language in tables (higher is better).

``<metric>`` is :attr:`LmEvalConfig.metric` (``acc`` by default, the accuracy of multiple-choice
tasks); a task whose main metric differs (a generation task's ``exact_match``) names its own in
:attr:`LmEvalConfig.task_metrics`, and its score counts in the language mean all the same.

The model is loaded from the local folder with transformers and handed to lm-eval as an ``HFLM``
instance, so lm-eval never resolves a model name on the Hugging Face Hub. lm-eval is an optional
dependency (``pip install 'obim-trainer[eval]'``), imported only when an evaluator is built.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from obim_trainer.distributed import plain_model_loading
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.settings.yaml_files import YamlConfig

logger = logging.getLogger(__name__)

LMEVAL_PREFIX = "lmeval_"
INSTALL_HINT = "pip install 'obim-trainer[eval]'"


def _metric_base(metric: str) -> str:
    """``acc`` of ``acc`` or of ``acc,none`` (lm-eval's ``<metric>,<filter>`` keys)."""
    return metric.partition(",")[0]


def task_metric_name(language: str, task: str, metric: str) -> str:
    """The name of one task's score (``lmeval_en_mmlu_acc``); a filter in ``metric`` is left out."""
    return f"{LMEVAL_PREFIX}{language}_{task}_{_metric_base(metric)}"


def language_metric_name(language: str, metric: str = "acc") -> str:
    """The name of a language's mean score (``lmeval_en_acc``)."""
    return f"{LMEVAL_PREFIX}{language}_{_metric_base(metric)}"


class LmEvalConfig(YamlConfig):
    """Which lm-eval tasks stand for which language, and how to run them (YAML: the same keys,
    e.g. ``configs/eval/lm_eval_example.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    described_as = "lm-eval configuration"

    tasks: dict[str, list[str]] = Field(
        description="language -> lm-eval task or group names, e.g. {en: [mmlu], zh: [ceval-valid]}."
    )
    metric: str = Field(
        default="acc",
        description="The metric read from every task's results: a name (acc; the 'none' filter is preferred, "
        "else the task's first) or 'metric,filter' (exact_match,strict-match). It also names the language means.",
    )
    task_metrics: dict[str, str] = Field(
        default_factory=dict, description="task -> its own metric where it is not `metric` (generation tasks)."
    )
    limit: int | float | None = Field(
        default=None, gt=0, description="Samples per task: a count, or a fraction of the task below 1 (lm-eval's)."
    )
    batch_size: int | Literal["auto"] = Field(default=8, description="Requests per forward pass, or 'auto'.")
    num_fewshot: int | None = Field(
        default=None, ge=0, description="Few-shot examples for every task; default: each task's own."
    )
    include_path: Path | None = Field(default=None, description="Folder of your own task YAMLs, added to lm-eval's.")
    include_defaults: bool = Field(
        default=True, description="Also index lm-eval's own tasks; false starts faster when include_path has all."
    )

    @model_validator(mode="after")
    def _tasks_are_well_formed(self) -> LmEvalConfig:
        if not self.tasks:
            raise ValueError("tasks is empty; give {language: [task, ...]}, e.g. {en: [mmlu], zh: [ceval-valid]}")
        owner: dict[str, str] = {}
        for language, names in self.tasks.items():
            if not names:
                raise ValueError(f"tasks['{language}'] is empty; name at least one lm-eval task for it")
            for name in names:
                if name in owner:  # lm-eval runs each task once; its score cannot stand for two languages
                    raise ValueError(f"task '{name}' is listed twice (under '{owner[name]}' and '{language}')")
                owner[name] = language
        if not self.include_defaults and self.include_path is None:
            raise ValueError("include_defaults is false and there is no include_path: no task would be known")
        unknown = sorted(set(self.task_metrics) - set(owner))
        if unknown:
            raise ValueError(f"task_metrics names {unknown}, which are not in tasks")
        return self

    @property
    def task_names(self) -> list[str]:
        """Every task, in language order."""
        return [name for names in self.tasks.values() for name in names]


def _pick_key(row: Mapping[str, Any], metric: str) -> str | None:
    """The result key of ``metric``: itself when it names a filter, else ``<metric>,none``, else the first filter."""
    if "," in metric:
        return metric if metric in row else None
    keys = [k for k in row if k.partition(",")[0] == metric and isinstance(row[k], int | float)]
    return f"{metric},none" if f"{metric},none" in keys else (keys[0] if keys else None)


class LmEvalEvaluator:
    """Scores a model folder on lm-eval-harness tasks, grouped by language (see the module's docstring).

    Building one checks every task name against lm-eval's index (its own tasks and ``include_path``),
    so a typo fails before training or merging starts rather than at the first evaluation.

    Args:
        config: The tasks per language and how to run them, or the same as a mapping.
    """

    higher_is_better = True

    def __init__(self, config: LmEvalConfig | Mapping[str, Any]) -> None:
        self.config = config if isinstance(config, LmEvalConfig) else LmEvalConfig.build(config)
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise ConfigError(f"evaluating on lm-eval-harness tasks needs lm-eval: {INSTALL_HINT} ({exc})") from None

        include = self.config.include_path
        if include is not None and not include.is_dir():
            raise ConfigError(f"include_path {include} is not a folder; point it at the folder of your task YAMLs")
        self._task_manager = TaskManager(
            include_path=str(include) if include is not None else None,
            include_defaults=self.config.include_defaults,
        )
        self._check_task_names()

    def _check_task_names(self) -> None:
        known = set(self._task_manager.all_tasks)
        tags = set(self._task_manager.all_tags)
        searched = ["lm-eval's own tasks"] if self.config.include_defaults else []
        if self.config.include_path is not None:
            searched.append(f"include_path {self.config.include_path}")
        for language, names in self.config.tasks.items():
            for name in names:
                if name in tags:  # a tag runs its tasks but reports no score under its own name
                    raise ConfigError(
                        f"tasks['{language}']: '{name}' is an lm-eval tag, which has no score of its own; "
                        "list its tasks, or a group with aggregate_metric_list"
                    )
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else "."
                    raise ConfigError(
                        f"tasks['{language}']: lm-eval has no task or group '{name}' (searched "
                        f"{' and '.join(searched)}){hint} Check the name against lm-eval's task list, "
                        "or add the task's YAML to include_path."
                    )

    @property
    def languages(self) -> list[str]:
        return list(self.config.tasks)

    def language_metric(self, language: str) -> str:
        """The metric that stands for ``language`` in comparison tables: the mean of its task scores."""
        return language_metric_name(language, self.config.metric)

    def evaluate_folder(self, folder: Path, device: torch.device | str = "cpu") -> dict[str, float]:
        """Every task score and every language mean of the model in ``folder`` (a local model folder)."""
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        model, tokenizer = _load_local(Path(folder))
        lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, batch_size=self.config.batch_size)
        output = simple_evaluate(
            model=lm,
            tasks=self.config.task_names,
            num_fewshot=self.config.num_fewshot,
            limit=self.config.limit,
            task_manager=self._task_manager,
            bootstrap_iters=0,  # no stderr: tables and objectives compare the scores themselves
            log_samples=False,
        )
        metrics = self._metrics(output["results"])
        logger.info("lm-eval on %s: %s", folder, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def _metrics(self, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for language, names in self.config.tasks.items():
            scores = []
            for name in names:
                metric = self.config.task_metrics.get(name, self.config.metric)
                row = results.get(name, {})
                key = _pick_key(row, metric)
                if key is None:
                    reported = sorted(k for k in row if "," in k and "_stderr" not in k)
                    raise ConfigError(
                        f"lm-eval reported no '{metric}' for '{name}' (it reported: "
                        f"{', '.join(reported) or 'nothing; a group without aggregate_metric_list'}); "
                        f"set task_metrics: {{{name}: <one of those>}} or list the group's tasks instead"
                    )
                metrics[task_metric_name(language, name, metric)] = float(row[key])
                scores.append(float(row[key]))
            metrics[self.language_metric(language)] = math.fsum(scores) / len(scores)
        return metrics


def _load_local(folder: Path) -> tuple[Any, Any]:
    """Model and tokenizer from a local folder alone (never a Hub name), outside any ZeRO-3 partitioning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a model folder; evaluate a folder written by save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with plain_model_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the model and tokenizer in {folder} to evaluate it ({exc})") from None
    return model, tokenizer

"""``obim-merge-ckpts --method obim,ties --total-share 1.0,0.6 --evaluate``: several merges and one table.

Merges the same checkpoints with every method (and OBIM at every total share) into
``<output>/<name>/``, evaluates the base, the checkpoints and every merge with one evaluator, picks
one merge by the stated :class:`~obim_trainer.evaluation.comparison.Objective` and writes
``<output>/comparison.md`` and ``comparison.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, model_validator

from obim_trainer.calibration.data import load_calibration_texts
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.evaluation import ModelEvaluator, PerLanguageEvaluator, load_eval_sets
from obim_trainer.evaluation.comparison import (
    ComparisonRow,
    ComparisonTable,
    Objective,
    RowKind,
    evaluate_folders,
    pick,
)
from obim_trainer.pipeline.variants import (
    MergeSpec,
    MergeVariant,
    default_candidates,
    merge_variants,
    plan_specs,
    plan_variants,
    wants_default_candidates,
)
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.names import setting_name
from obim_trainer.settings.yaml_files import YamlConfig

if TYPE_CHECKING:
    from obim_trainer.pipeline.merge import MergeResult

logger = logging.getLogger(__name__)

COMPARISON_KEYS = (
    "methods",
    "merges",
    "total_shares",
    "sweep",
    "evaluate",
    "eval_data",
    "eval_samples",
    "eval_max_length",
    "eval_batch_size",
    "eval_text_field",
    "eval_checkpoints",
    "lm_eval",
    "objective",
)


class ComparisonConfig(YamlConfig):
    """Which merges to make besides each other and how to evaluate them (names as in OBIMConfig)."""

    model_config = ConfigDict(extra="forbid")
    described_as = "comparison configuration"

    methods: list[str] = Field(min_length=1, description="Merge methods, e.g. [obim, ties, dare_ties].")
    merges: list[MergeSpec] | None = Field(
        default=None,
        description="Merges as entries ({method, params, total_shares, sweep, label}, as the demo's merges:) in place "
        "of methods/total_shares/sweep. Default with a new language, per-language calibration, evaluation and no "
        "method named: default_candidates() (OBIM, sequential regmean at base_weight 0.3, 1, 3).",
    )
    total_shares: list[float] | None = Field(
        default=None, description="OBIM's Σ n_k values to sweep, e.g. [1.0, 0.6, 0.3] (1.0 is the paper)."
    )
    sweep: dict[str, list[Any]] | None = Field(
        default=None,
        description="Parameters to sweep, {name: [values]}: one merge per value (the product for several) for every "
        "method that has the parameter, named like regmean@base_weight=1 (CLI: --param base_weight=0.3,1,3).",
    )
    evaluate: bool = False
    eval_data: dict[str, Path] | None = Field(default=None, description="{language: file} of evaluation texts.")
    eval_samples: int = Field(default=200, ge=1)
    eval_max_length: int = Field(default=512, ge=2)
    eval_batch_size: int = Field(default=8, ge=1)
    eval_text_field: str = "text"
    eval_checkpoints: bool = Field(default=True, description="Also evaluate the base and the checkpoints.")
    lm_eval: Path | None = Field(
        default=None, description="YAML of LmEvalConfig: score with lm-eval-harness tasks per language instead."
    )
    objective: Objective = Objective()

    @model_validator(mode="after")
    def _evaluation_has_data(self) -> ComparisonConfig:
        if self.eval_data and self.lm_eval:
            raise ValueError("give eval_data (loss per language) or lm_eval (lm-eval-harness tasks), not both")
        if self.eval_data or self.lm_eval:
            self.evaluate = True
        elif self.evaluate:
            raise ValueError(
                f"evaluate needs eval_data ({setting_name('eval_data', 'en=en_eval.jsonl')}) "
                f"or lm_eval ({setting_name('lm_eval', 'tasks.yaml')})"
            )
        return self

    @property
    def several(self) -> bool:
        """Whether this asks for more than the one plain merge ``obim-merge-ckpts`` makes by default."""
        several = len(self.methods) > 1 or bool(self.merges) or bool(self.total_shares) or bool(self.sweep)
        return several or self.evaluate


def default_comparison(values: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The default candidates' entries when YAML and flags name no method or merges but a new language with
    per-language calibration and evaluation data (the callback compares the same ones); else ``None``."""
    named = any(values.get(key) for key in ("method", "methods", "merges"))
    evaluated = values.get("eval_data") or values.get("lm_eval")
    if (
        named
        or not evaluated
        or not wants_default_candidates(values.get("calibration_data"), values.get("new_languages") or [])
    ):
        return None
    return [spec.model_dump(exclude_defaults=True) for spec in default_candidates()]


def _check_outputs_free(root: Path, variants: list[MergeVariant], overwrite: bool) -> None:
    """Fail before any merge when a merge would replace an existing folder (nothing lost)."""
    taken = [v.name for v in variants if (root / v.name).exists()]
    if taken and not overwrite:
        raise ConfigError(
            f"{root} already holds {', '.join(taken)}; choose another {setting_name('output')} or set "
            f"{setting_name('overwrite')} to replace them"
        )


def build_evaluator(comparison: ComparisonConfig, tokenizer_dir: Path) -> PerLanguageEvaluator:
    """The per-language loss evaluator on ``eval_data``, tokenized with the merged models' tokenizer."""
    from transformers import AutoTokenizer

    assert comparison.eval_data is not None
    sets = load_eval_sets(
        comparison.eval_data,
        AutoTokenizer.from_pretrained(tokenizer_dir),
        max_samples=comparison.eval_samples,
        max_length=comparison.eval_max_length,
        text_field=comparison.eval_text_field,
    )
    return PerLanguageEvaluator(sets, batch_size=comparison.eval_batch_size)


def check_eval_files(comparison: ComparisonConfig) -> None:
    """Read the first text of every ``eval_data`` file now, so a wrong path, format or text field fails
    before the first merge writes anything (the sets are tokenized later, with the merges' tokenizer)."""
    for language, source in (comparison.eval_data or {}).items():
        if isinstance(source, str | Path):
            try:
                load_calibration_texts(
                    source, num_samples=1, text_field=comparison.eval_text_field, setting="eval_data"
                )
            except CalibrationError as exc:
                raise ConfigError(f"eval_data['{language}']: {exc}") from None


def _vocab_size(folder: Path) -> int | None:
    return json.loads((folder / "config.json").read_text()).get("vocab_size")


def reference_folders(config: MergeConfig, checkpoints: list[Path], merged: Path) -> dict[str, tuple[Path, RowKind]]:
    """The base and the checkpoints that load as they are (Hugging Face weights), for the table.

    A base with a smaller vocabulary than the merges cannot read their tokenizer's ids and is left out.
    """
    from obim_trainer.checkpoints.detect import hf_format, is_peft_adapter

    folders: dict[str, tuple[Path, RowKind]] = {}
    if _vocab_size(config.base) == _vocab_size(merged):
        folders["base"] = (config.base, "base")
    else:
        logger.info("the checkpoints extend the base's vocabulary; the base is not evaluated with their tokenizer")
    for path in checkpoints:
        if is_peft_adapter(path) or hf_format(path) is None:
            logger.info("%s holds no full model weights (adapter or ZeRO shards only); not evaluated", path)
            continue
        folders[path.name] = (path, "checkpoint")
    return folders


def plan(config: MergeConfig, comparison: ComparisonConfig, num_models: int) -> list[MergeVariant]:
    """Every merge the comparison makes: its ``merges`` entries, else methods × total shares × swept values."""
    if comparison.merges:
        return plan_specs(comparison.merges, num_models)
    return plan_variants(comparison.methods, config.params, comparison.total_shares, num_models, comparison.sweep)


def plan_comparison(config: MergeConfig, comparison: ComparisonConfig) -> str:
    """``--dry-run`` of a comparison: one line per merge it would make, then each merge's plan under its name."""
    from obim_trainer.pipeline.merge import merge_checkpoints, resolve_checkpoints

    checkpoints = resolve_checkpoints(config)
    variants = plan(config, comparison, len(checkpoints))
    check_eval_files(comparison)
    listing = [f"{len(variants)} merge(s) of the same checkpoints:"]
    listing += [f"  {v.name}: {v.method} {json.dumps(v.params, sort_keys=True)}" for v in variants]
    blocks = ["\n".join(listing)]
    for variant in variants:
        values = {**config.model_dump(), "method": variant.method, "params": variant.params}
        values |= {"checkpoints": checkpoints, "run_dir": None}
        blocks.append(f"# {variant.name}\n{merge_checkpoints(MergeConfig.build(values)).plan_text}")
    return "\n\n".join(blocks)


Evaluation = Callable[[Mapping[str, Path]], ComparisonTable]
"""Evaluates the merges (folder by name), with whatever references the caller adds, into one table."""


@dataclass
class Comparison:
    """What :func:`merge_evaluate_pick` made: each merge's folder and result, the table and the pick."""

    folders: dict[str, Path]
    results: dict[str, MergeResult] = field(default_factory=dict)
    table: ComparisonTable | None = None
    best: ComparisonRow | None = None


def merge_evaluate_pick(
    batches: Sequence[tuple[MergeConfig, Sequence[MergeVariant]]],
    output_root: Path,
    *,
    evaluate: Evaluation | None = None,
    objective: Objective | None = None,
    merge: Callable[[MergeConfig], MergeResult] | None = None,
) -> Comparison:
    """The one "variants → merge → evaluate → pick" of the command, the callback's sweep and the demo.

    ``batches``: merges sharing one configuration, as ``(config, variants)`` (the demo gives an entry its own
    calibration samples), each written to ``output_root/<variant name>`` by
    :func:`~obim_trainer.pipeline.variants.merge_variants` through ``merge`` (default
    :func:`~obim_trainer.pipeline.merge.merge_checkpoints`; the callback splits each merge between its ranks).
    ``evaluate`` turns the folders into a :class:`ComparisonTable` (the command's per-language evaluator, the
    callback's, the demo's with the base and checkpoints beside); ``objective`` picks one merge of it.
    """
    from obim_trainer.pipeline.merge import merge_checkpoints

    make = merge or merge_checkpoints
    results: dict[str, MergeResult] = {}

    def merge_one(config: MergeConfig) -> MergeResult:
        assert config.output is not None
        results[config.output.name] = result = make(config)
        return result

    folders: dict[str, Path] = {}
    for config, variants in batches:
        folders.update(merge_variants(config, variants, output_root, merge=merge_one))
    if evaluate is None:
        return Comparison(folders, results)
    table = evaluate(folders)
    if objective is None:  # one merge, evaluated only
        return Comparison(folders, results, table)
    best = pick(table, objective)
    logger.info("picked %s (%s)", best.name, table.pick_reason)
    return Comparison(folders, results, table, best)


def compare_merges(
    config: MergeConfig, comparison: ComparisonConfig, evaluator: ModelEvaluator | None = None
) -> tuple[dict[str, Path], ComparisonTable | None]:
    """Make every merge into ``config.output/<name>``; with evaluation, the comparison table (also written there).

    ``evaluator`` replaces the one built from ``eval_data`` (e.g. the lm-eval-harness adapter).
    """
    from obim_trainer.pipeline.merge import resolve_checkpoints

    assert config.output is not None
    if evaluator is None and comparison.lm_eval is not None:  # task names are checked before any merge
        from obim_trainer.evaluation import LmEvalConfig, LmEvalEvaluator

        evaluator = LmEvalEvaluator(LmEvalConfig.from_yaml(comparison.lm_eval))
    checkpoints = resolve_checkpoints(config)
    variants = plan(config, comparison, len(checkpoints))
    _check_outputs_free(config.output, variants, config.overwrite)
    check_eval_files(comparison)
    chosen = config.model_copy(update={"checkpoints": checkpoints, "run_dir": None})

    def evaluate(merged: Mapping[str, Path]) -> ComparisonTable:
        first = next(iter(merged.values()))  # the merges' tokenizer (an extended vocabulary's)
        folders = reference_folders(config, checkpoints, first) if comparison.eval_checkpoints else {}
        folders.update({name: (path, "merge") for name, path in merged.items()})
        used = evaluator or build_evaluator(comparison, first)
        return evaluate_folders(folders, used, device=config.device, progress=config.progress)

    evaluated = comparison.evaluate or evaluator is not None
    made = merge_evaluate_pick(
        [(chosen, variants)], config.output, evaluate=evaluate if evaluated else None, objective=comparison.objective
    )
    if made.table is not None:
        made.table.write(config.output)
    return made.folders, made.table

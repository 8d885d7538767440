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
    MergeVariant,
    default_candidates,
    merge_variants,
    plan_specs,
    plan_variants,
    wants_default_candidates,
)
from obim_trainer.settings.comparison import ComparisonConfig
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.names import setting_name

if TYPE_CHECKING:
    from obim_trainer.pipeline.merge import MergeResult

logger = logging.getLogger(__name__)


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
                raise ConfigError(f"{setting_name('eval_data', {language: str(source)})}: {exc}") from None


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
    sweep: Callable[[Sequence[MergeConfig]], list[MergeResult]] | None = None,
) -> Comparison:
    """The one "variants → merge → evaluate → pick" of the command, the callback's sweep and the demo.

    ``batches``: merges sharing one configuration, as ``(config, variants)`` (the demo gives an entry its own
    calibration samples), each written to ``output_root/<variant name>`` by
    :func:`~obim_trainer.pipeline.variants.merge_variants` through ``sweep`` (default
    :func:`~obim_trainer.pipeline.merge.merge_sweep`; the callback splits the merges between its ranks).
    ``evaluate`` turns the folders into a :class:`ComparisonTable` (the command's per-language evaluator, the
    callback's, the demo's with the base and checkpoints beside); ``objective`` picks one merge of it.
    """
    results: dict[str, MergeResult] = {}
    for config, variants in batches:
        results.update(merge_variants(config, variants, output_root, sweep=sweep))
    folders = {name: Path(output_root) / name for name in results}
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

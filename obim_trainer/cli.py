"""``obim-merge-ckpts``: merge continued-pretraining checkpoints back into their base, after training."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from obim_trainer.errors import ConfigError, OBIMError
from obim_trainer.evaluation.comparison import Objective
from obim_trainer.merging import MergeMethod, available_methods
from obim_trainer.merging.obim import OBIMParams
from obim_trainer.merging.registry import StatisticsNeeds
from obim_trainer.pipeline.compare import compare_merges, default_comparison, plan_comparison
from obim_trainer.settings.blocks import CalibrationSettings, InputSettings, MethodSettings, OutputSettings
from obim_trainer.settings.comparison import COMPARISON_KEYS, ComparisonConfig, EvaluationSettings, VariantSettings
from obim_trainer.settings.flags import add_setting, describe
from obim_trainer.settings.merge import MergeConfig, merge_overrides
from obim_trainer.settings.names import settings_spelled
from obim_trainer.settings.yaml_files import load_yaml_config

logger = logging.getLogger("obim_trainer")

DESCRIPTION = """\
Merge continued-pretraining checkpoints back into their base model with OBIM
(Optimal Brain Iterative Merging, arXiv 2502.12217) or a baseline method, and write
a Hugging Face model folder that AutoModelForCausalLM.from_pretrained loads.

OBIM scores every weight of every checkpoint by how much changing it moves the
layer's output (activation statistics from ~100 calibration texts of the new domain),
then lets each checkpoint claim its most salient positions in turn, so no two
checkpoints are ever averaged. It recovers much of what the base knew while keeping
what continued pre-training taught.
"""

EXAMPLES = """\
examples:
  # three checkpoints, OBIM with the paper's defaults (equal shares, rotating order)
  obim-merge-ckpts --base ./qwen2-7b --checkpoints run/checkpoint-3000 run/checkpoint-4000 \\
      run/checkpoint-5000 --calibration-data calib.jsonl --output ./merged

  # the 3 best checkpoints of a Trainer run by a logged metric
  obim-merge-ckpts --base ./qwen2-7b --run-dir run/ --top-k 3 --metric eval_ja_loss \\
      --calibration-data calib.jsonl --output ./merged

  # settings from YAML; flags override it
  obim-merge-ckpts --config configs/merge/obim.yaml --output ./merged-2

  # compare OBIM (also keeping 40% and 70% of the base) with TIES, one table of per-language losses
  obim-merge-ckpts --config configs/merge/obim.yaml --method obim,ties --total-share 1.0,0.6,0.3 \\
      --evaluate --eval-data en=en_eval.jsonl ja=ja_eval.jsonl --output ./compared

  # RegMean at three base weights (base on old-language text, checkpoints on new), beside OBIM
  obim-merge-ckpts --config configs/merge/regmean.yaml --method regmean,obim --param base_weight=0.3,1,3 \\
      --calibration-data en=en.jsonl ja=ja.jsonl --new-language ja \\
      --evaluate --eval-data en=en_eval.jsonl ja=ja_eval.jsonl --output ./compared

  # check everything and print the per-tensor plan without writing
  obim-merge-ckpts --config configs/merge/obim.yaml --dry-run

  obim-merge-ckpts --list-methods
"""


class SweepValues(list):
    """Values of ``--param KEY=V1,V2,...``: one merge per value."""


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. --param density=0.5)")
    stripped = value.strip()
    if "," in stripped and not stripped.startswith(("[", "{", "'", '"')):
        return key.strip(), SweepValues(yaml.safe_load(v) for v in stripped.split(",") if v.strip())
    return key.strip(), yaml.safe_load(value)


def _split_sweeps(pairs: list[tuple[str, Any]], yaml_sweep: dict[str, Any] | None) -> tuple[dict, dict]:
    """``--param`` pairs as (params, sweeps); the YAML ``sweep`` of a key the flags set is replaced by them."""
    params = {k: v for k, v in pairs if not isinstance(v, SweepValues)}
    sweeps = {k: list(v) for k, v in pairs if isinstance(v, SweepValues)}
    kept = {k: v for k, v in (yaml_sweep or {}).items() if k not in params and k not in sweeps}
    return params, {**kept, **sweeps}


def _parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r} (e.g. 1.0,0.6,0.3)"
        ) from None


def _parse_eval_data(text: str) -> tuple[str, Path]:
    language, sep, path = text.partition("=")
    if not sep or not language or not path:
        raise argparse.ArgumentTypeError(f"expected LANG=FILE, got {text!r} (e.g. --eval-data en=en_eval.jsonl)")
    return language.strip(), Path(path)


SPECIAL_FLAGS: dict[str, dict[str, Any]] = {
    "top_k": {"metavar": "K"},
    "ratios": {"metavar": "N_K"},
    "calibration_data": {"nargs": "+", "metavar": "FILE | LANG=FILE"},
    "new_languages": {"dest": "new_language", "metavar": "LANG"},
    "eval_data": {"type": _parse_eval_data, "nargs": "+", "metavar": "LANG=FILE"},
    "lm_eval": {"metavar": "TASKS.yaml"},
    "calibration_text_field": {"metavar": "FIELD"},
    "eval_text_field": {"metavar": "FIELD"},
    "out_shard_size": {"metavar": "SIZE"},
    "kind": {"flag": "--objective", "dest": "objective", "after": "(--new-language names it, --new-limit the limit)"},
    "total_shares": {
        "type": _parse_floats,
        "nargs": None,
        "metavar": "S,S,...",
        "after": "Written as --output/obim@0.6/.",
    },
    "params": {
        "type": _parse_param,
        "action": "append",
        "metavar": "KEY=VALUE",
        "dest": "param",
        "after": "Repeatable (e.g. --param density=0.5 --param lambda=1.0). Several values, comma-separated, "
        "sweep it: --param base_weight=0.3,1,3 makes one merge per value, written as --output/regmean@base_weight=1/ "
        "(several swept parameters: every combination; a list value is [a,b]).",
    },
    "method": {
        "after": "Several, comma-separated (obim,ties,dare_ties): "
        + describe(ComparisonConfig.model_fields["methods"].description or "")
    },
}
"""Flags whose name, parsing or help goes beyond what their field says (help still starts from the field)."""

NO_FLAG = frozenset({"merges", "sweep", "methods", "objective"})
"""Settings with no flag of their own: merges (YAML), sweep (--param K=V1,V2), methods (--method a,b),
objective (--objective, --new-language, --new-limit)."""

OBIM_FLAGS = ("ratios", "order", "priority", "embedding_saliency")
"""OBIM's parameters that have a flag of their own (any method's parameter: --param)."""
BLOCK_FLAGS: dict[type[BaseModel], tuple[str, ...]] = {
    OBIMParams: OBIM_FLAGS,
    Objective: ("kind", "new_limit"),  # new_language: --new-language, also the calibration's new side
}
"""Blocks of which only some fields have flags."""
BLOCK_PREFIX: dict[type[BaseModel], str] = {OBIMParams: "OBIM:"}

GROUPS: tuple[tuple[str, tuple[type[BaseModel], ...]], ...] = (
    ("inputs: what to merge", (InputSettings,)),
    ("calibration (methods that read activations, input Grams or Fisher diagonals)", (CalibrationSettings,)),
    ("method: how to merge", (MethodSettings, OBIMParams)),
    (
        "evaluation: compare merges (several methods, total shares or swept parameters)",
        (VariantSettings, ComparisonConfig, EvaluationSettings, Objective),
    ),
    ("output", (OutputSettings,)),
)
"""The help's groups, each the flags of these blocks' fields in the order they declare them."""


def _add_block(group: argparse._ArgumentGroup, block: type[BaseModel], done: set[str]) -> None:
    """The flags of ``block``'s fields not added yet (ComparisonConfig shares its blocks' fields)."""
    own = [name for name in block.model_fields if name not in done and name not in NO_FLAG]
    for name in BLOCK_FLAGS.get(block, own):
        add_setting(group, block, name, before=BLOCK_PREFIX.get(block, ""), **SPECIAL_FLAGS.get(name, {}))
        done.add(name)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: one flag per setting of the blocks, in the help's groups."""
    parser = argparse.ArgumentParser(
        prog="obim-merge-ckpts",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # flags not given do not override YAML
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file with any of the settings below; flags override it."
    )
    parser.add_argument(
        "--list-methods", action="store_true", help="List merge methods with their parameters and exit."
    )
    done: set[str] = set()
    for title, blocks in GROUPS:
        group = parser.add_argument_group(title)
        for block in blocks:
            _add_block(group, block, done)
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Default INFO.")
    return parser


OBJECTIVE_FLAGS = {"objective": "kind", "new_language": "new_language", "new_limit": "new_limit"}


def _calibration_data(values: list[str]) -> str | dict[str, str]:
    """One FILE as given, or LANG=FILE pairs as ``{language: file}`` (a lone existing file may contain '=')."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return values[0]
    pairs: dict[str, str] = {}
    for text in values:
        language, sep, path = text.partition("=")
        if not sep or not language.strip() or not path:
            raise ConfigError(
                f"--calibration-data takes one FILE or LANG=FILE pairs (en=en.jsonl ru=ru.jsonl), got {text!r}"
            )
        if language.strip() in pairs:
            raise ConfigError(f"--calibration-data names the language {language.strip()!r} twice; give each once")
        pairs[language.strip()] = path
    return pairs


def _split_comparison(values: dict[str, Any]) -> dict[str, Any]:
    """Pop the comparison settings out of the merged YAML+flag values; ``method`` may list several."""
    defaults = default_comparison(values)
    if defaults is not None:
        values["merges"] = defaults
    methods = values.pop("methods", None) or values.get("method", "obim")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    values["method"] = methods[0] if methods else "obim"
    compared = {key: values.pop(key) for key in COMPARISON_KEYS if key in values}
    compared["methods"] = methods
    return compared


def _refuse_ratios_with_total_shares(merged: dict[str, Any], given: dict[str, Any]) -> None:
    """Fixed shares n_k and a list of totals Σ n_k (Eq. 7's budget) contradict each other: the totals
    would rescale the ratios away, so both at once is refused, each named as the user wrote it."""
    ratios = (merged.get("params") or {}).get("ratios")
    if ratios is None or not merged.get("total_shares"):
        return
    ratios_name = "--ratios" if "ratios" in given.get("params", {}) else "params: ratios:"
    shares_name = "--total-share" if "total_shares" in given else "total_shares:"
    raise ConfigError(
        f"{ratios_name} {ratios} and {shares_name} {merged['total_shares']} both set the shares n_k of the "
        f"checkpoints; keep {ratios_name} for one merge with these shares or {shares_name} to compare totals "
        "(each split equally), not both"
    )


def config_from_args(args: argparse.Namespace) -> tuple[MergeConfig, ComparisonConfig]:
    """YAML (if any) overridden by flags, validated: the merge settings and the comparison settings."""
    given = vars(args).copy()
    for key in ("list_methods", "log_level"):
        given.pop(key, None)
    source = given.pop("config", None)
    values = load_yaml_config(source) if source is not None else {}
    params, sweeps = _split_sweeps(given.pop("param", []), values.get("sweep"))
    if sweeps:
        given["sweep"] = sweeps
    params.update({key: given.pop(key) for key in OBIM_FLAGS if key in given})
    if params:
        given["params"] = params
    if "eval_data" in given:
        given["eval_data"] = dict(given["eval_data"])
    if "calibration_data" in given:
        given["calibration_data"] = _calibration_data(given["calibration_data"])
    if "new_language" in given:  # the calibration's new side, and the objective's language when there is one
        given["new_languages"] = given.pop("new_language")
        if len(given["new_languages"]) == 1:
            given["new_language"] = given["new_languages"][0]
    objective = {field: given.pop(flag) for flag, field in OBJECTIVE_FLAGS.items() if flag in given}
    if objective:
        given["objective"] = {**(values.get("objective") or {}), **objective}
    merged = merge_overrides(values, given)
    _refuse_ratios_with_total_shares(merged, given)
    comparison = ComparisonConfig.build(_split_comparison(merged), source=source)
    return MergeConfig.build(merged, source=source), comparison


def default_statistics(cls: type[MergeMethod]) -> StatisticsNeeds:
    """What a method reads with its default parameters (the class flag if those do not build alone)."""
    k = cls.min_models if cls.max_models == cls.min_models else max(2, cls.min_models)
    try:
        return cls({}, num_models=k).statistics()
    except OBIMError:
        return StatisticsNeeds(activations=cls.needs_activation_stats)


def needs_label(needs: StatisticsNeeds) -> str:
    """``[needs ...]``: which calibration a method needs and what is measured on it ('' for none)."""
    if not needs.any:
        return ""
    kinds = [
        what
        for wanted, what in (
            (needs.activations, "activation statistics"),
            (needs.grams, "input Grams"),
            (needs.fishers, "Fisher diagonals"),
            (needs.sequential, "layer inputs, merged layer by layer"),
        )
        if wanted
    ]
    data = (
        "per-language --calibration-data (LANG=FILE ...) and --new-language"
        if needs.per_language
        else "--calibration-data"
    )
    return f"  [needs {data}: {', '.join(kinds)}]"


def format_methods() -> str:
    """Every registered method with its parameters and defaults, and the statistics its defaults need."""
    blocks = []
    for name, cls in available_methods().items():
        head = f"{name}{needs_label(default_statistics(cls))}"
        body = [textwrap.fill(cls.summary, 88, initial_indent="    ", subsequent_indent="    ")] if cls.summary else []
        for field_name, field in cls.Params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            doc = f" — {field.description}" if field.description else ""
            body.append(f"    {field.alias or field_name}: {default}{doc}")
        blocks.append("\n".join([head, *body]))
    return "\n\n".join(blocks) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "INFO")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if getattr(args, "list_methods", False):
        sys.stdout.write(format_methods())
        return 0
    try:
        with settings_spelled("cli", _yaml_keys(args)):
            return _run(args)
    except OBIMError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; nothing was written and the inputs are untouched")
        return 130


def _yaml_keys(args: argparse.Namespace) -> set[str]:
    """Keys the ``--config`` file sets that no flag overrides: errors name them as YAML keys."""
    if getattr(args, "config", None) is None or not Path(args.config).is_file():
        return set()
    try:
        values = load_yaml_config(args.config)
    except OBIMError:
        return set()
    return {str(key) for key in values if key not in vars(args)}


def _run(args: argparse.Namespace) -> int:
    """One ``obim-merge-ckpts`` run: a comparison, its plan, or one merge (and its plan)."""
    from obim_trainer.pipeline.merge import merge_checkpoints

    config, comparison = config_from_args(args)
    if comparison.several and config.dry_run:
        sys.stdout.write(plan_comparison(config, comparison) + "\n")
        return 0
    if comparison.several:
        _, table = compare_merges(config, comparison)
        if table is not None:
            sys.stdout.write(table.to_markdown() + "\n")
        return 0
    result = merge_checkpoints(config)
    if result.plan_text is not None:
        sys.stdout.write(result.plan_text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared blocks every configuration is composed of: each setting declared once, here.

:class:`~obim_trainer.settings.merge.MergeConfig` (the command), :class:`~obim_trainer.settings.callback.OBIMConfig`
(the callback) and :class:`~obim_trainer.settings.comparison.ComparisonConfig` (with the comparison's own
blocks, :mod:`~obim_trainer.settings.comparison`) inherit these blocks, so a
setting has one description, default, bound and set of choices wherever it is read: YAML keys, keyword
arguments, the flags of ``obim-merge-ckpts`` (generated from these fields, help texts included) and the
README's configuration reference. A description names another setting as ```name```; the command's
``--help`` shows it as the flag.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator
from pydantic.fields import FieldInfo

OutputDType = Literal["auto", "float32", "bfloat16", "float16"]
ZeroWeights = Literal["auto", "saved", "master"]
NewRows = Literal["obim", "best", "average", "first"]
MetricMode = Literal["auto", "min", "max"]


def _known_device(value: str) -> str:
    if value != "cpu" and not value.startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_known_device)]
"""Where merge math runs: ``cpu`` or ``cuda[:N]``."""


def same_setting(block: type[BaseModel], name: str, **changes: Any) -> FieldInfo:
    """The field ``name`` of ``block`` for a configuration that calls it otherwise (the callback's
    ``base_model`` is the merge's ``base``): the same description, default, bounds and choices;
    ``changes`` (e.g. ``default``) replace attributes of the copy."""
    field = copy.copy(block.model_fields[name])
    for attribute, value in changes.items():
        setattr(field, attribute, value)
    return field


class InputSettings(BaseModel):
    """Which checkpoints are merged into which base, and how their weights are read."""

    base: Path = Field(description="Folder of the base model (the model before continued pre-training).")
    checkpoints: list[Path] = Field(
        default_factory=list,
        description="Checkpoint folders, in merge order (for OBIM's 'given' order, first merged first).",
    )
    run_dir: Path | None = Field(
        default=None,
        description="Trainer output_dir: pick `top_k` checkpoints from it by `metric` instead of `checkpoints`.",
    )
    top_k: int | None = Field(default=None, ge=1, description="How many checkpoints to pick from `run_dir`.")
    metric: str | None = Field(
        default=None,
        description="Metric logged in trainer_state.json to rank checkpoints by, e.g. eval_ja_loss "
        "(best first; ties go to the later step; a NaN ranks last).",
    )
    metric_mode: MetricMode = Field(
        default="auto", description="Whether lower or higher `metric` is better (auto: lower for losses/perplexities)."
    )
    zero_weights: ZeroWeights = Field(
        default="auto",
        description="DeepSpeed checkpoints: auto reads the weights the Trainer saved (model.safetensors) when "
        "present, else the fp32 master weights of the ZeRO shards; saved requires the saved ones; master reads "
        "the fp32 masters.",
    )


class CalibrationSettings(BaseModel):
    """The texts the statistics of data-aware methods (activations, input Grams, Fisher diagonals) are
    measured on, and where those statistics are kept."""

    calibration_data: Any = Field(
        default=None,
        description="JSONL (field 'text'), .json (a list of objects, or JSON Lines), .txt (one sample per line), "
        ".parquet or a datasets.Dataset (blank and null texts skipped; evaluation and training files are read "
        "the same way); or "
        "{language: file} with `new_languages` naming the new ones: methods with per-language statistics "
        "measure the base on the old languages and each checkpoint on the new ones, others read all.",
    )
    new_languages: list[str] = Field(
        default_factory=list,
        description="The language(s) continued pre-training added: the new side of `calibration_data`, and the "
        "language the old_avg `objective` excludes (one).",
    )
    calibration_samples: int = Field(default=100, ge=1, description="Samples to use (100 is the paper's best).")
    calibration_max_length: int = Field(default=512, ge=1, description="Tokens per calibration sample.")
    calibration_batch_size: int = Field(default=8, ge=1, description="Forward batch size for the statistics.")
    calibration_text_field: str = Field(default="text", description="Text field of JSONL/parquet rows.")
    stats_cache_dir: Path | None = Field(
        default=None,
        description="Where statistics are kept (default $OBIM_STATS_CACHE, else the user cache's stats/).",
    )
    stats_beside_checkpoints: bool = Field(
        default=False,
        description="Write new statistics into each checkpoint folder (obim_stats/) instead of the cache; "
        "otherwise folders given as inputs are never written.",
    )
    recompute_stats: bool = Field(default=False, description="Ignore cached statistics and measure them again.")

    @field_validator("new_languages", mode="before")
    @classmethod
    def _one_language_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class MethodSettings(BaseModel):
    """How the checkpoints are merged."""

    method: str = Field(default="obim", description="Merge method; obim-merge-ckpts --list-methods lists them.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The method's parameters, {name: value} (e.g. {density: 0.5})."
    )
    new_rows: NewRows = Field(
        default="obim",
        description="Extended vocabulary: embedding/lm_head rows the base lacks. obim: merged by the method with "
        "the base taken as zero; best: from the best checkpoint by `metric`; first: from the first checkpoint; "
        "average: their mean.",
    )
    seed: int = Field(default=0, description="Seed for random saliency and random methods.")


class OutputSettings(BaseModel):
    """What is written where, and what computes it."""

    output: Path | None = Field(
        default=None,
        description="New folder for the merged model (appears only when complete); when comparing, the folder "
        "that holds one such folder per merge and the comparison table.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing output folder.")
    out_shard_size: str | int = Field(default="5GB", description="Largest safetensors shard.")
    tokenizer_source: Path | None = Field(
        default=None,
        description="Copy the tokenizer from here (default: the base's, or the first checkpoint's when the "
        "checkpoints extend the vocabulary); calibration texts are tokenized with it too.",
    )
    dtype: OutputDType = Field(
        default="auto",
        description="Output dtype; auto keeps each tensor's dtype in the base, whatever the checkpoints hold. "
        "Math is always float32.",
    )
    device: Device = Field(
        default="cpu",
        description="cpu or cuda[:N] for the merge math and statistics; tensors are read on the CPU, moved to "
        "the GPU one at a time and written back.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="Processes that merge in parallel, each a share of the tensors and of the CPU threads; the "
        "output is byte for byte the one-process output.",
    )
    dry_run: bool = Field(default=False, description="Validate inputs and print the plan; write nothing.")
    progress: bool = Field(default=True, description="Show progress bars.")


class ScheduleSettings(BaseModel):
    """When the callback merges and what it keeps."""

    merge_every_saves: int = Field(default=0, ge=0, description="Merge every N saves (0: not by count).")
    merge_on_change: bool = Field(default=False, description="Merge whenever the selected set changes.")
    merge_at_end: bool = Field(default=True, description="Merge the selected checkpoints when training ends.")
    min_checkpoints: int = Field(default=2, ge=1, description="Merge only once this many checkpoints are selected.")
    keep_merged: int = Field(default=2, ge=1, description="How many merged-step-N folders to keep.")
    load_merged_at_end: bool = Field(default=False, description="Load the last merge into the trained model.")
    keep_sweep: bool = Field(
        default=False, description="Keep every compared merge in sweep-step-N/ (disk: one model each)."
    )

"""The configuration of one offline merge, shared by the CLI, YAML files and the Python API.

A YAML file holds the same keys as :class:`MergeConfig` (``method``/``params`` as in
``configs/merge/*.yaml``); command-line flags override it key by key, and method
parameters given on the command line override ``params`` entry by entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from obim_trainer.settings.names import setting_name
from obim_trainer.settings.yaml_files import YamlConfig

OutputDType = Literal["auto", "float32", "bfloat16", "float16"]
ZeroWeights = Literal["auto", "saved", "master"]
NewRows = Literal["obim", "best", "average", "first"]


class MergeConfig(YamlConfig):
    """Everything ``obim-merge-ckpts`` needs. Paths are kept as given and resolved when used."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    described_as = "merge configuration"

    base: Path = Field(description="Folder of the base model (config, tokenizer, weights).")
    checkpoints: list[Path] = Field(default_factory=list, description="Checkpoint folders, in the given order.")
    run_dir: Path | None = Field(default=None, description="Trainer output folder to pick checkpoints from.")
    top_k: int | None = Field(default=None, ge=1, description="How many checkpoints to pick from run_dir.")
    metric: str | None = Field(default=None, description="trainer_state.json metric to rank checkpoints by.")
    metric_mode: Literal["auto", "min", "max"] = "auto"

    method: str = "obim"
    params: dict[str, Any] = Field(default_factory=dict)

    calibration_data: Any = Field(
        default=None,
        description="JSONL/text/parquet path or a datasets.Dataset, or {language: file} (text per language; with "
        "new_languages, methods with per-language statistics measure the base on the old languages and each "
        "checkpoint on the new ones; other methods read all languages' texts together).",
    )
    new_languages: list[str] = Field(
        default_factory=list,
        description="Languages of calibration_data that continued pre-training added; the others are old.",
    )
    calibration_samples: int = Field(default=100, ge=1)
    calibration_max_length: int = Field(default=512, ge=1)
    calibration_batch_size: int = Field(default=8, ge=1)
    calibration_text_field: str = "text"
    stats_cache_dir: Path | None = Field(
        default=None, description="Where statistics are kept (default $OBIM_STATS_CACHE or the user cache's)."
    )
    stats_beside_checkpoints: bool = Field(
        default=False,
        description="Write new statistics into each checkpoint's obim_stats/ instead of the cache folder.",
    )
    recompute_stats: bool = False

    zero_weights: ZeroWeights = Field(
        default="auto",
        description=(
            "DeepSpeed checkpoints: 'auto' reads the weights the Trainer saved (model.safetensors) when present, "
            "else the fp32 master weights; 'saved' requires the saved ones; 'master' reads the fp32 masters."
        ),
    )
    new_rows: NewRows = Field(
        default="obim",
        description=(
            "Extended vocabularies: how embedding/lm_head rows the base lacks are merged. 'obim': the merge "
            "method itself with the base taken as zero there; 'best': from the best checkpoint by metric; "
            "'first': from the first checkpoint; 'average': the mean of the checkpoints."
        ),
    )

    output: Path | None = None
    out_shard_size: str | int = "5GB"
    tokenizer_source: Path | None = None
    dtype: OutputDType = Field(
        default="auto", description="Output dtype; 'auto' keeps each tensor's dtype in the base. Math is float32."
    )
    device: str = "cpu"
    workers: int = Field(
        default=1, ge=1, description="Processes that merge in parallel, each a share of the tensors; same output."
    )
    seed: int = 0
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = True

    @field_validator("new_languages", mode="before")
    @classmethod
    def _one_language_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_way_to_choose_checkpoints(self) -> MergeConfig:
        if self.checkpoints and self.run_dir is not None:
            raise ValueError("give either checkpoints or run_dir (with top_k and metric), not both")
        if self.run_dir is not None and (self.top_k is None or self.metric is None):
            example = f"{setting_name('top_k', '3')} and {setting_name('metric', 'eval_ja_loss')}"
            raise ValueError(f"run_dir needs top_k and metric (e.g. {example})")
        if not self.checkpoints and self.run_dir is None:
            raise ValueError(
                f"no checkpoints: set {setting_name('checkpoints', '[DIR, ...]')} or {setting_name('run_dir', 'DIR')} "
                f"with {setting_name('top_k', 'K')} and {setting_name('metric', 'NAME')}"
            )
        if self.output is None and not self.dry_run:
            raise ValueError(
                f"no output folder: set {setting_name('output', 'DIR')} (or {setting_name('dry_run')} to only print "
                "the plan)"
            )
        return self


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; ``params`` is merged entry by entry instead of replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if key == "params" and isinstance(merged.get("params"), dict):
            merged["params"] = {**merged["params"], **value}
        else:
            merged[key] = value
    return merged

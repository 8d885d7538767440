"""Settings of :class:`~obim_trainer.training.callback.OBIMCallback`, from Python or from YAML.

The merge settings (method, params, calibration) have the names and meaning they have in
:class:`~obim_trainer.settings.merge.MergeConfig`, so a merge made during training can be repeated
offline with ``obim-merge-ckpts`` from the same values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from obim_trainer.calibration.languages import check_languages
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation.comparison import Objective
from obim_trainer.merging import build_method
from obim_trainer.pipeline.variants import (
    MergeSpec,
    MergeVariant,
    accepts_total_share,
    default_candidates,
    plan_specs,
    wants_default_candidates,
)
from obim_trainer.settings.merge import MergeConfig, OutputDType
from obim_trainer.settings.yaml_files import YamlConfig, load_yaml_config, section_of

logger = logging.getLogger(__name__)


class OBIMConfig(YamlConfig):
    """What the callback records at each save, which checkpoints it merges, when, and where."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    described_as = "OBIM callback configuration"

    base_model: Path = Field(description="Folder of the base model the run started from (config, tokenizer, weights).")
    tokenizer_source: Path | None = Field(default=None, description="Tokenizer folder if the base has none.")

    # activation statistics, recorded on the live model at every save
    calibration_data: Any = Field(
        default=None,
        description="JSONL/text/parquet path or a datasets.Dataset, or {language: file} with new_languages.",
    )
    new_languages: list[str] = Field(
        default_factory=list,
        description="Languages of calibration_data the run adds; methods with per-language statistics (regmean, "
        "fisher_merging) measure the base on the others and the checkpoints on these, at merge time.",
    )
    calibration_samples: int = Field(default=100, ge=1)
    calibration_max_length: int = Field(default=512, ge=1)
    calibration_batch_size: int = Field(default=8, ge=1)
    calibration_text_field: str = "text"

    # the project's per-language evaluator (checkpoints and merged models alike)
    eval_data: dict[str, Any] | None = Field(
        default=None, description="{language: file or dataset}; texts or pre-tokenized input_ids."
    )
    eval_samples: int = Field(default=200, ge=1, description="Samples per language.")
    eval_max_length: int = Field(default=512, ge=2)
    eval_batch_size: int = Field(default=8, ge=1)
    eval_text_field: str = "text"
    eval_device: str | None = Field(
        default=None, description="Where merged models are evaluated (default: the Trainer's device)."
    )

    # selection
    select_metric: str = Field(
        default="eval_loss", description="e.g. eval_ja_loss (Trainer) or obim_ja_loss (evaluator)."
    )
    select_mode: Literal["auto", "min", "max"] = "auto"
    top_k: int = Field(default=3, ge=1)
    selector: str = Field(default="top_k", description="A registered selector: top_k or latest.")

    # merging
    method: str = "obim"
    params: dict[str, Any] = Field(default_factory=dict)
    merge_every_saves: int = Field(default=0, ge=0, description="Merge every N saves (0: not by count).")
    merge_on_change: bool = Field(default=False, description="Merge whenever the selected set changes.")
    merge_at_end: bool = True
    min_checkpoints: int = Field(default=2, ge=1, description="Merge only once this many checkpoints are selected.")
    keep_merged: int = Field(default=2, ge=1, description="How many merged-step-N folders to keep.")
    load_merged_at_end: bool = Field(default=False, description="Load the last merge into the trained model.")
    total_share_sweep: list[float] | None = Field(
        default=None,
        description="Merge at each total share Σn_k (e.g. [1.0, 0.6, 0.3]; below 1 part of the base is kept), "
        "evaluate each with eval_data and keep the one objective picks as merged-step-N.",
    )
    merges: list[MergeSpec] | None = Field(
        default=None,
        description="Merges made side by side at each merge point, entries as in the demo's merges: ({method, params, "
        "total_shares, sweep, label}); each is evaluated with eval_data and the objective's pick is kept as "
        "merged-step-N. Default with new_languages and eval_data: default_candidates() (OBIM as published, "
        "sequential regmean at base_weight 0.3, 1, 3, and method/params).",
    )
    objective: Objective = Field(default_factory=Objective, description="How the sweep picks: avg or old_avg.")
    keep_sweep: bool = Field(
        default=False, description="Keep every sweep merge in sweep-step-N/ (disk: one model each)."
    )
    merge_device: str = "cpu"
    dtype: OutputDType = "auto"
    out_shard_size: str | int = "5GB"
    seed: int = 0

    # ZeRO-3 with stage3_gather_16bit_weights_on_model_save off saves no model weights
    consolidate_checkpoints: bool = Field(
        default=True, description="Write model.safetensors into checkpoints that lack model weights."
    )

    output_subdir: str = Field(default="obim", description="Folder under output_dir for merges and protected copies.")
    log_saliency: bool = Field(default=True, description="Log saliency histograms and ownership per layer type.")
    saliency_blocks: int = Field(default=3, ge=1, description="Decoder blocks sampled for saliency statistics.")
    histogram_bins: int = Field(default=64, ge=2)
    on_error: Literal["raise", "warn"] = Field(
        default="warn", description="A failed merge stops training (raise) or is logged and skipped (warn)."
    )

    @model_validator(mode="after")
    def _can_merge(self) -> OBIMConfig:
        if self.min_checkpoints > self.top_k:
            raise ValueError(
                f"min_checkpoints={self.min_checkpoints} exceeds top_k={self.top_k}: no merge would ever run"
            )
        if self.merges and self.total_share_sweep:
            raise ValueError("give merges or total_share_sweep, not both (an entry can have total_shares)")
        if self.merges is not None and not self.merges:
            raise ValueError("merges is empty; list at least one {method: ...} entry or leave merges out")
        if self.merges and self.eval_data is None:
            raise ValueError("merges are compared by evaluating each: give eval_data={language: file}")
        if any(spec.calibration_samples is not None for spec in self.merges or []):
            raise ValueError("merges entries cannot set calibration_samples in the callback; set it once for the run")
        defaults = wants_default_candidates(self.calibration_data, self.new_languages)
        if defaults and self.eval_data is None and not self.merges and not self.total_share_sweep:
            logger.warning(
                "new_languages without eval_data: the default candidates (OBIM, regmean at base_weight 0.3/1/3) "
                "cannot be compared, so only method '%s' is merged; give eval_data={language: file} to compare them",
                self.method,
            )
        if self.total_share_sweep:
            if self.eval_data is None:
                raise ValueError("total_share_sweep evaluates every merge: give eval_data={language: file}")
            if not accepts_total_share(self.method):
                raise ValueError(f"total_share_sweep needs a method with shares n_k (obim), not '{self.method}'")
            if not all(0.0 < s <= 1.0 for s in self.total_share_sweep):
                raise ValueError(f"total_share_sweep values must lie in (0, 1], got {self.total_share_sweep}")
        self._check_candidates()
        return self

    def _check_candidates(self) -> None:
        """Every merge this run may make builds and has the calibration it needs, before training starts."""
        variants = self.plan_candidates(self.top_k) or [MergeVariant(self.method, self.method, self.params)]
        for variant in variants:
            needs = build_method(variant.method, variant.params, num_models=self.top_k).statistics()
            check_languages(self.calibration_data, self.new_languages, needs, variant.method)

    def candidate_specs(self) -> list[MergeSpec] | None:
        """The merges compared at each merge point, or ``None`` for the one merge of ``method``/``params``.

        ``merges`` as given; ``total_share_sweep`` as one entry of ``method`` over those shares; with
        ``new_languages`` (and eval_data to compare them) :func:`~obim_trainer.pipeline.variants.default_candidates`.
        """
        if self.merges:
            return list(self.merges)
        if self.total_share_sweep:
            return [MergeSpec(method=self.method, params=self.params, total_shares=self.total_share_sweep)]
        if wants_default_candidates(self.calibration_data, self.new_languages) and self.eval_data is not None:
            return default_candidates(MergeSpec(method=self.method, params=self.params))
        return None

    def plan_candidates(self, num_models: int) -> list[MergeVariant] | None:
        """The merges of :meth:`candidate_specs` for ``num_models`` checkpoints (``None``: one plain merge)."""
        specs = self.candidate_specs()
        return None if specs is None else plan_specs(specs, num_models)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> OBIMConfig:
        """Read a YAML file, or one top-level ``section`` of it (``obim:`` in ``configs/callback/example.yaml``)."""
        data = load_yaml_config(path)
        if section is not None:
            if not isinstance(data.get(section), dict):
                raise ConfigError(f"config file {path} has no '{section}:' mapping with the callback settings")
            return cls.build(data[section], source=section_of(path, section))
        return cls.build(data, source=path)

    def merge_config(self, checkpoints: list[Path], output: Path | None) -> MergeConfig:
        """The offline merge of ``checkpoints`` with these settings (``output=None``: a dry run)."""
        return MergeConfig.build(
            {
                "base": self.base_model,
                "checkpoints": checkpoints,
                "method": self.method,
                "params": self.params,
                "calibration_data": self.calibration_data,
                "new_languages": self.new_languages,
                "calibration_samples": self.calibration_samples,
                "calibration_max_length": self.calibration_max_length,
                "calibration_batch_size": self.calibration_batch_size,
                "calibration_text_field": self.calibration_text_field,
                "tokenizer_source": self.tokenizer_source,
                "output": output,
                "dry_run": output is None,
                "overwrite": True,  # merged-step-N belongs to this run; a resumed run may redo a step
                "stats_beside_checkpoints": True,  # the checkpoints of this run, in its own output folder
                "out_shard_size": self.out_shard_size,
                "dtype": self.dtype,
                "device": self.merge_device,
                "seed": self.seed,
                "progress": False,
            }
        )

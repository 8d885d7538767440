"""Settings of :class:`~obim_trainer.training.callback.OBIMCallback`, from Python or from YAML.

The merge settings (method, params, calibration) have the names and meaning they have in
:class:`~obim_trainer.settings.merge.MergeConfig`, so a merge made during training can be repeated
offline with ``obim-merge-ckpts`` from the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from obim_trainer.calibration.languages import check_languages
from obim_trainer.errors import ConfigError
from obim_trainer.merging import build_method
from obim_trainer.pipeline.variants import (
    MergeSpec,
    MergeVariant,
    accepts_total_share,
    default_candidates,
    plan_specs,
    wants_default_candidates,
)
from obim_trainer.settings.blocks import (
    CalibrationSettings,
    InputSettings,
    MethodSettings,
    MetricMode,
    OutputDType,
    OutputSettings,
    ScheduleSettings,
    ZeroWeights,
    same_setting,
)
from obim_trainer.settings.comparison import EvaluationSettings, VariantSettings
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.names import settings_spelled
from obim_trainer.settings.yaml_files import YamlConfig, load_yaml_config, section_of

logger = logging.getLogger(__name__)


CALLBACK_NAMES = {
    "base": "base_model",
    "device": "merge_device",
    "metric": "select_metric",
    "metric_mode": "select_mode",
}
"""MergeConfig settings the callback calls otherwise (the same declaration, see ``same_setting``); the
callback's own ``select_metric`` is its ``metric``, with a default (eval_loss). (The comparison's
``total_shares`` is the callback's ``total_share_sweep``; entries of ``merges`` keep ``total_shares``.)"""

CHOSEN_BY_CALLBACK = {
    "checkpoints": "the callback merges the top_k checkpoints it selected by select_metric",
    "run_dir": "the callback merges the checkpoints of the run it is attached to",
    "top_k": "the merge gets the checkpoints the callback selected; top_k here is how many it selects",
    "output": "merges are written to output_dir/<output_subdir>/merged-step-N",
    "overwrite": "merged-step-N belongs to the run; a resumed run may redo a step",
    "dry_run": "the callback always merges; plan a merge offline with obim-merge-ckpts --dry-run",
    "progress": "progress bars stay off inside training logs",
}
"""MergeConfig fields the callback sets itself, and why; given to :class:`OBIMConfig` they are refused."""


@contextmanager
def callback_spelling() -> Iterator[None]:
    """Errors within name settings as keys of :class:`OBIMConfig` (its YAML section, its keywords):
    ``base_model: DIR``, not ``--base DIR``."""
    with settings_spelled("yaml", renamed=CALLBACK_NAMES):
        yield


class OBIMConfig(CalibrationSettings, MethodSettings, EvaluationSettings, ScheduleSettings, YamlConfig):
    """What the callback records at each save, which checkpoints it merges, when, and where.

    Every :class:`~obim_trainer.settings.merge.MergeConfig` setting is here under its own name, under the
    name in :data:`CALLBACK_NAMES`, or is chosen by the callback (:data:`CHOSEN_BY_CALLBACK`: ``checkpoints``,
    ``run_dir``, ``output``, ``overwrite``, ``dry_run``, ``progress``; refused with the reason).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    described_as = "OBIM callback configuration"

    base_model: Path = same_setting(
        InputSettings,
        "base",
        description="Folder of the base model the run started from (config, tokenizer, weights); the merges' base.",
    )
    zero_weights: ZeroWeights = same_setting(InputSettings, "zero_weights")
    tokenizer_source: Path | None = same_setting(OutputSettings, "tokenizer_source")
    out_shard_size: str | int = same_setting(OutputSettings, "out_shard_size")
    dtype: OutputDType = same_setting(OutputSettings, "dtype")
    merge_device: str = same_setting(OutputSettings, "device")
    workers: int = same_setting(OutputSettings, "workers")
    stats_beside_checkpoints: bool = same_setting(
        CalibrationSettings,
        "stats_beside_checkpoints",
        default=True,  # the checkpoints of this run, in its own output folder
    )

    # the project's per-language evaluator (checkpoints and merged models alike)
    eval_device: str | None = Field(
        default=None, description="Where merged models are evaluated (default: the Trainer's device)."
    )

    # selection
    select_metric: str = Field(
        default="eval_loss",
        description="Metric the checkpoints are selected by: eval_ja_loss (Trainer) or obim_ja_loss (evaluator).",
    )
    select_mode: MetricMode = same_setting(InputSettings, "metric_mode")
    top_k: int = Field(default=3, ge=1, description="How many checkpoints are selected and merged.")
    selector: str = Field(default="top_k", description="A registered selector: top_k or latest.")

    # compared merges (the sweep)
    merges: list[MergeSpec] | None = same_setting(VariantSettings, "merges")
    total_share_sweep: list[float] | None = same_setting(VariantSettings, "total_shares")

    # ZeRO-3 with stage3_gather_16bit_weights_on_model_save off saves no model weights
    consolidate_checkpoints: bool = Field(
        default=True, description="Write model.safetensors into checkpoints that lack model weights."
    )

    output_subdir: str = Field(default="obim", description="Folder under output_dir for merges and protected copies.")
    log_saliency: bool = Field(default=True, description="Log saliency histograms and ownership per layer type.")
    saliency_blocks: int = Field(default=3, ge=1, description="Decoder blocks sampled for saliency statistics.")
    histogram_bins: int = Field(default=64, ge=2, description="Bins of the saliency histograms.")
    on_error: Literal["raise", "warn"] = Field(
        default="warn", description="A failed merge stops training (raise) or is logged and skipped (warn)."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_the_callback_chooses(cls, values: Any) -> Any:
        if isinstance(values, Mapping):
            for key in values:
                if key in CHOSEN_BY_CALLBACK and key not in cls.model_fields:
                    raise ValueError(f"{key} is chosen by the callback ({CHOSEN_BY_CALLBACK[key]}); remove it")
                if key in CALLBACK_NAMES:
                    raise ValueError(f"{key} is called {CALLBACK_NAMES[key]} in the callback's settings; rename it")
        return values

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
        """Every merge this run may make builds and has the calibration it needs, before training starts
        (errors name the settings as keys of this configuration, the callback's YAML)."""
        variants = self.plan_candidates(self.top_k) or [MergeVariant(self.method, self.method, self.params)]
        with callback_spelling():
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
        with callback_spelling():
            data = load_yaml_config(path)
            if section is None:
                return cls.build(data, source=path)
            if not isinstance(data.get(section), dict):
                raise ConfigError(f"config file {path} has no '{section}:' mapping with the callback settings")
            return cls.build(data[section], source=section_of(path, section))

    def merge_config(self, checkpoints: list[Path], output: Path | None) -> MergeConfig:
        """The offline merge of ``checkpoints`` with these settings (``output=None``: a dry run): every
        MergeConfig field from its namesake here (or its :data:`CALLBACK_NAMES` name), the chosen ones set."""
        chosen = {"checkpoints": checkpoints, "output": output, "dry_run": output is None, "overwrite": True}
        chosen |= {"progress": False}
        shared = {
            name: getattr(self, CALLBACK_NAMES.get(name, name))
            for name in MergeConfig.model_fields
            if name not in CHOSEN_BY_CALLBACK
        }
        return MergeConfig.build({**shared, **chosen})

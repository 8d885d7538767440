"""What a comparison merges side by side and how it judges them: blocks shared by the command and the callback.

:class:`ComparisonConfig` is the part of ``obim-merge-ckpts`` that makes several merges (``--method a,b``,
``--total-share``, ``--param k=v1,v2``, ``merges:``) and evaluates them; the callback's sweep reads the same
:class:`VariantSettings` and :class:`EvaluationSettings` fields (see
:class:`~obim_trainer.settings.callback.OBIMConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from obim_trainer.evaluation.comparison import Objective
from obim_trainer.pipeline.variants import MergeSpec
from obim_trainer.settings.names import setting_name
from obim_trainer.settings.yaml_files import YamlConfig


class VariantSettings(BaseModel):
    """Several merges of the same checkpoints, compared side by side."""

    merges: list[MergeSpec] | None = Field(
        default=None,
        description="Merges as entries {method, params, total_shares, sweep, label} (as the demo's merges:); each "
        "is evaluated and the `objective` picks one. Default with `new_languages`, per-language "
        "`calibration_data` and evaluation data and no method named: default_candidates() (OBIM as published, "
        "sequential regmean at base_weight 0.3, 1, 3).",
    )
    total_shares: list[float] | None = Field(
        default=None,
        description="OBIM: one merge per total share Σn_k (e.g. [1.0, 0.6, 0.3]; 1.0 is the paper); below 1 part "
        "of each tensor keeps the base's values, trading new-language gain for old-language recovery.",
    )
    sweep: dict[str, list[Any]] | None = Field(
        default=None,
        description="Parameters to sweep, {name: [values]}: one merge per value (every combination for several) "
        "of each method that has the parameter, named like regmean@base_weight=1.",
    )


class EvaluationSettings(BaseModel):
    """The per-language loss that judges checkpoints and merges, and how one merge is picked."""

    eval_data: dict[str, Any] | None = Field(
        default=None,
        description="{language: file or dataset} of evaluation texts (JSONL with 'text', .json, .txt or .parquet) or "
        "pre-tokenized input_ids.",
    )
    eval_samples: int = Field(default=200, ge=1, description="Evaluation samples per language.")
    eval_max_length: int = Field(default=512, ge=2, description="Tokens per evaluation sample.")
    eval_batch_size: int = Field(default=8, ge=1, description="Evaluation batch size.")
    eval_text_field: str = Field(default="text", description="Text field of JSONL/parquet evaluation rows.")
    objective: Objective = Field(
        default_factory=Objective,
        description="How the best merge is picked: {kind: avg} (mean over all languages) or {kind: old_avg, "
        "new_language, new_limit} (best on the old languages among merges within new_limit on the new one).",
    )


class ComparisonConfig(VariantSettings, EvaluationSettings, YamlConfig):
    """Which merges to make beside each other and how to evaluate them (names as in OBIMConfig)."""

    model_config = ConfigDict(extra="forbid")
    described_as = "comparison configuration"

    methods: list[str] = Field(
        min_length=1,
        description="Methods compared, one merge each in `output`/<method>/ (e.g. [obim, ties, dare_ties]).",
    )
    evaluate: bool = Field(
        default=False,
        description="Evaluate the base, the checkpoints and every merge per language and write "
        "`output`/comparison.md and comparison.json.",
    )
    eval_checkpoints: bool = Field(default=True, description="Also evaluate the base and the checkpoints.")
    lm_eval: Path | None = Field(
        default=None,
        description="Score with lm-eval-harness tasks per language instead of `eval_data` (pip install "
        "'obim-trainer[eval]'); a YAML file as configs/eval/lm_eval_example.yaml.",
    )

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


COMPARISON_KEYS = tuple(ComparisonConfig.model_fields)
"""The keys of a merge YAML (and flags) that belong to the comparison rather than to each merge."""

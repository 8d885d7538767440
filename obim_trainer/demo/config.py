"""Settings of the forgetting-recovery demo (``configs/demo/*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from obim_trainer.errors import ConfigError
from obim_trainer.evaluation.comparison import Objective
from obim_trainer.pipeline.variants import MergeSpec, MergeVariant, plan_specs
from obim_trainer.settings.yaml_files import YamlConfig


class ModelShape(BaseModel):
    """The tiny Llama trained from scratch."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(default=128, ge=8)
    num_hidden_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=384, ge=8)


class Phase(BaseModel):
    """One training phase (pretraining on the old languages, or continued pretraining on the new one)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(default=16, ge=1)
    warmup_steps: int = Field(default=0, ge=0)


def default_merges() -> list[MergeSpec]:
    """OBIM at three total shares and the shipped baselines at their defaults."""
    baselines = ["task_arithmetic", "ties", "dare_ties", "della", "widen", "consensus", "pcb"]
    return [MergeSpec(method="obim", total_shares=[1.0, 0.6, 0.3]), *(MergeSpec(method=m) for m in baselines)]


class DemoConfig(YamlConfig):
    """What the demo trains, on which text, and which merges it compares."""

    model_config = ConfigDict(extra="forbid")
    described_as = "demo configuration"

    old_languages: list[str] = Field(default=["en", "de"], min_length=1)
    new_language: str = "zh"
    max_train_entries: int = Field(default=6000, ge=10, description="Fortunes per language for training.")
    eval_entries: int = Field(default=64, ge=2, description="Held-out fortunes per language for evaluation.")
    calibration_samples: int = Field(
        default=32,
        ge=1,
        description="Calibration texts per language: the base is measured on the old ones and the checkpoints on "
        "the new one where a method needs it; OBIM's activation statistics read all of them together.",
    )
    vocab_size: int = Field(default=4096, ge=300)
    block_size: int = Field(default=128, ge=8)
    model: ModelShape = ModelShape()
    pretrain: Phase = Phase(steps=500, learning_rate=3e-3, warmup_steps=20)
    continued: Phase = Phase(steps=300, learning_rate=1e-3)
    save_steps: int = Field(default=50, ge=1)
    top_k: int = Field(default=3, ge=1)
    merges: list[MergeSpec] = Field(
        default_factory=default_merges, min_length=1, description="What the comparison merges, entry by entry."
    )
    objective: Objective = Field(default_factory=Objective, description="How the table picks one merge.")
    seed: int = 0
    report_to: Literal["none", "wandb"] = "none"

    @model_validator(mode="after")
    def _languages_differ(self) -> DemoConfig:
        if self.new_language in self.old_languages:
            raise ValueError(f"new_language '{self.new_language}' is also an old language")
        return self

    @model_validator(mode="after")
    def _merges_plan(self) -> DemoConfig:
        try:
            self.planned_merges()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def planned_merges(self) -> list[MergeVariant]:
        """Every merge of the comparison, in order (checked when the configuration is read)."""
        return plan_specs(self.merges, self.top_k)

    def family_of(self) -> dict[str, str]:
        """The curve (entry) each merge belongs to, by merge name."""
        return {v.name: spec.family for spec in self.merges for v in spec.plan(self.top_k)}

    @property
    def languages(self) -> list[str]:
        return [*self.old_languages, self.new_language]

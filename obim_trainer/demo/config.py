"""Settings of the forgetting-recovery demo (``configs/demo/*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from obim_trainer.comparison import Objective
from obim_trainer.yaml_config import YamlConfig


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


class DemoConfig(YamlConfig):
    """What the demo trains, on which text, and which merges it compares."""

    model_config = ConfigDict(extra="forbid")
    described_as = "demo configuration"

    old_languages: list[str] = Field(default=["en", "de"], min_length=1)
    new_language: str = "zh"
    max_train_entries: int = Field(default=6000, ge=10, description="Fortunes per language for training.")
    eval_entries: int = Field(default=64, ge=2, description="Held-out fortunes per language for evaluation.")
    calibration_samples: int = Field(default=96, ge=1, description="Spread over all languages (paper: all tasks).")
    vocab_size: int = Field(default=4096, ge=300)
    block_size: int = Field(default=128, ge=8)
    model: ModelShape = ModelShape()
    pretrain: Phase = Phase(steps=500, learning_rate=3e-3, warmup_steps=20)
    continued: Phase = Phase(steps=300, learning_rate=1e-3)
    save_steps: int = Field(default=50, ge=1)
    top_k: int = Field(default=3, ge=1)
    methods: list[str] = Field(
        default=["obim", "task_arithmetic", "ties", "dare_ties", "della", "widen", "consensus", "pcb"], min_length=1
    )
    total_shares: list[float] = Field(default=[1.0, 0.6, 0.3], description="OBIM's Σn_k sweep (1.0 = the paper).")
    objective: Objective = Field(default_factory=Objective, description="How the table picks one merge.")
    seed: int = 0
    report_to: Literal["none", "wandb"] = "none"

    @model_validator(mode="after")
    def _languages_differ(self) -> DemoConfig:
        if self.new_language in self.old_languages:
            raise ValueError(f"new_language '{self.new_language}' is also an old language")
        return self

    @property
    def languages(self) -> list[str]:
        return [*self.old_languages, self.new_language]

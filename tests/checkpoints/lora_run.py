"""A real two-step Trainer run of a PEFT LoRA model on CPU that leaves an adapter ``checkpoint-2``."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import VOCAB_SIZE
from tests.tiny_training import random_token_rows, training_arguments


def train_adapter(base: Path, output: Path, config: dict, seed: int) -> Path:
    """Two steps of a real Trainer on a LoRA model of ``base``; return the saved ``checkpoint-2``."""
    import peft
    from transformers import AutoModelForCausalLM, Trainer

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**config))
    data = random_token_rows(8, 16, 4, VOCAB_SIZE, seed)
    args = training_arguments(output, max_steps=2, eval_strategy="no", learning_rate=2e-2, seed=seed)
    Trainer(model=model, args=args, train_dataset=data).train()
    return output / "checkpoint-2"


def merged_state_dict(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft itself makes of the adapter: ``merge_and_unload()`` of it on ``base``."""
    return merged_model(base, adapter).state_dict()


def merged_model(base: Path, adapter: Path) -> torch.nn.Module:
    import peft
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()

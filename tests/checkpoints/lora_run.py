"""A real two-step Trainer run of a PEFT LoRA model on CPU that leaves an adapter ``checkpoint-2``."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import VOCAB_SIZE


def train_adapter(base: Path, output: Path, config: dict, seed: int) -> Path:
    """Two steps of a real Trainer on a LoRA model of ``base``; return the saved ``checkpoint-2``."""
    import peft
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(8):
        ids = torch.randint(4, VOCAB_SIZE, (16,), generator=generator)
        data.append({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(output),
        use_cpu=True,
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to="none",
        disable_tqdm=True,
        logging_steps=100,
        seed=seed,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    return output / "checkpoint-2"


def merged_state_dict(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft itself makes of the adapter: ``merge_and_unload()`` of it on ``base``."""
    return merged_model(base, adapter).state_dict()


def merged_model(base: Path, adapter: Path) -> torch.nn.Module:
    import peft
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()

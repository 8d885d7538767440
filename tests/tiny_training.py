"""Short real ``Trainer`` runs on CPU: the arguments every test run shares, and random token data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def training_arguments(output_dir: Path | str, **overrides: Any) -> Any:
    """``TrainingArguments`` for a few CPU steps with a save (and an evaluation) every two; ``overrides`` win."""
    from transformers import TrainingArguments

    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 8,
        "save_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "logging_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 3e-3,
        "use_cpu": True,  # DeepSpeed's batch-size check fails on CPU without it
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def random_token_rows(count: int, length: int, low: int, high: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` causal-LM rows of token ids drawn from ``[low, high)``, labels equal to the inputs."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(low, high, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids})
    return rows

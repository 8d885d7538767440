"""Continued pre-training of any causal LM with the Hugging Face Trainer and OBIMCallback.

Every save records the checkpoint's activation statistics and per-language evaluation; the best
checkpoints by ``select_metric`` are merged back into the base (OBIM, arXiv 2502.12217) into
``<output_dir>/obim/merged-step-N`` and everything is logged to the W&B run the Trainer opens.
The same script runs in one process, under ``accelerate launch`` and with DeepSpeed ZeRO-3::

    python examples/continued_pretraining.py --config configs/callback/example.yaml
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        examples/continued_pretraining.py --config configs/callback/example.yaml

The YAML file has four sections: ``model`` (a local folder), ``data`` (local text files),
``training`` (``TrainingArguments``) and ``obim`` (``OBIMConfig``); see configs/callback/example.yaml.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from obim_trainer import OBIMCallback, OBIMConfig
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.distributed import ZeroGatherer, is_main_process, run_on_main
from obim_trainer.errors import OBIMError
from obim_trainer.training_data import load_text_file, pack_blocks
from obim_trainer.yaml_config import load_yaml_config

logger = logging.getLogger("continued_pretraining")


def save_final_model(trainer: Any, output_dir: Path) -> None:
    """Save the final model; under ZeRO-3 without 16-bit gathering, write its weights one module at a time."""
    trainer.save_model(str(output_dir))
    if run_on_main(lambda: hf_format(output_dir) is None, f"looking for model weights in {output_dir}"):
        ZeroGatherer(trainer.model).write_checkpoint(output_dir, max_shard_size=5 * 10**9)


def finish_wandb_run() -> None:
    """Close the W&B run the Trainer opened (the Trainer leaves it open for the caller to log more)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML with model, data, training and obim.")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)

    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    try:
        settings = load_yaml_config(options.config)
        model_dir = Path(settings["model"])
        data = settings["data"]
        # TrainingArguments first: with ZeRO-3 it makes from_pretrained load the model partitioned
        args = TrainingArguments(**settings.get("training", {}))
        obim = OBIMConfig.build(
            {"base_model": model_dir, "eval_data": dict(data.get("eval", {})), **settings.get("obim", {})}
        )
    except KeyError as exc:
        logger.error("config %s lacks the %s setting", options.config, exc)
        return 2
    except (OBIMError, ValueError) as exc:
        logger.error("%s", exc)
        return 2

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    text_field = data.get("text_field", "text")
    block_size = int(data.get("block_size", 1024))
    with args.main_process_first(desc="tokenizing"):
        train = pack_blocks(load_text_file(data["train"]), tokenizer, text_field, block_size)
        evals = {
            lang: pack_blocks(load_text_file(path), tokenizer, text_field, block_size)
            for lang, path in data["eval"].items()
        }
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[OBIMCallback(obim)],
    )
    try:
        trainer.train(resume_from_checkpoint=settings.get("resume_from_checkpoint"))
        save_final_model(trainer, Path(args.output_dir))
        trainer.accelerator.wait_for_everyone()  # no rank leaves while the main one still writes
    finally:
        finish_wandb_run()
        if torch.distributed.is_initialized():
            # before interpreter exit: a process group destroyed by the exit itself can abort the process
            # ("terminate called without an active exception") while its threads still run
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Continued pre-training of any causal LM with the Hugging Face Trainer and OBIMCallback.

Every save records the checkpoint's activation statistics and the Trainer's per-language evaluation
(``eval_<lang>_loss`` on ``data.eval``); the best checkpoints by ``select_metric`` are merged back into
the base (OBIM, arXiv 2502.12217) into ``<output_dir>/obim/merged-step-N``, each merge is evaluated by
the Trainer on the same datasets, and everything is logged to the W&B run the Trainer opens.
The same script runs in one process, under ``accelerate launch`` and with DeepSpeed ZeRO-3::

    python examples/continued_pretraining.py --config configs/callback/example.yaml
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        examples/continued_pretraining.py --config configs/callback/example.yaml

To resume a stopped run from its latest checkpoint, add ``--resume`` (or set
``training.resume_from_checkpoint`` to a checkpoint folder); the callback picks up its record.

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

from obim_trainer import OBIMCallback, OBIMConfig
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.distributed import ZeroGatherer, is_main_process, run_on_main, world_size
from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.errors import ConfigError, OBIMError
from obim_trainer.quiet import hide_deepspeed_deprecations, zero_to_fp32_advice_hidden
from obim_trainer.settings.yaml_files import build_from_keywords, check_example_settings, load_yaml_config, section_of
from obim_trainer.training.text import load_text_file, pack_blocks

logger = logging.getLogger("continued_pretraining")


def save_final_model(trainer: Any, output_dir: Path) -> None:
    """Save the final model; under ZeRO-3 without 16-bit gathering, write its weights one module at a time."""
    with zero_to_fp32_advice_hidden():  # the weights are written right below, no zero_to_fp32.py needed
        trainer.save_model(str(output_dir))
    if run_on_main(lambda: hf_format(output_dir) is None, f"looking for model weights in {output_dir}"):
        ZeroGatherer(trainer.model).write_checkpoint(output_dir, max_shard_size=5 * 10**9)


def finish_wandb_run() -> None:
    """Close the W&B run the Trainer opened (the Trainer leaves it open for the caller to log more)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_settings(config: Path, training_arguments: type) -> tuple[dict[str, Any], Any, OBIMConfig]:
    """The YAML's sections, validated: every unknown key or bad value is one error naming the file and section."""
    settings = load_yaml_config(config)
    for section in ("model", "data"):
        if section not in settings:
            raise ConfigError(f"config {config} lacks the '{section}:' section; see configs/callback/example.yaml")
    data = settings["data"]
    for key in ("train", "eval"):
        if key not in data:
            raise ConfigError(f"{section_of(config, 'data')} lacks '{key}'; see configs/callback/example.yaml")
    # TrainingArguments first: with ZeRO-3 it makes from_pretrained load the model partitioned
    args = build_from_keywords(training_arguments, settings.get("training", {}), section_of(config, "training"))
    check_example_settings(settings, config)
    # merges are evaluated by the Trainer on data.eval, as the checkpoints are: no eval_data, no second pass
    obim = OBIMConfig.build(
        {"base_model": Path(settings["model"]), **settings.get("obim", {})}, source=section_of(config, "obim")
    )
    return settings, args, obim


def train(config: Path, resume: bool = False) -> int:
    """Build everything from ``config`` and train; the trainer and model live only in this frame.

    ``resume`` continues from the latest checkpoint of ``output_dir`` (the Trainer's
    ``resume_from_checkpoint=True``); without it, ``training.resume_from_checkpoint`` is honoured.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    try:
        settings, args, obim = build_settings(config, TrainingArguments)
    except (OBIMError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.deepspeed:  # ZeRO-3 partitions the model while from_pretrained builds it: DeepSpeed's group must exist
        import deepspeed

        deepspeed.init_distributed()
    model_dir, data = Path(settings["model"]), settings["data"]
    logger.info("training %s in %d process(es)", model_dir, world_size())  # the process group exists by now
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    text_field = data.get("text_field", "text")
    block_size = int(data.get("block_size", 1024))
    with args.main_process_first(desc="tokenizing"):
        train_rows = pack_blocks(load_text_file(data["train"], text_field), tokenizer, text_field, block_size)
        evals = {
            lang: pack_blocks(load_text_file(path, text_field), tokenizer, text_field, block_size)
            for lang, path in data["eval"].items()
        }
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=evals,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[OBIMCallback(obim)],
    )
    try:
        trainer.train(resume_from_checkpoint=True if resume else args.resume_from_checkpoint)
        save_final_model(trainer, Path(args.output_dir))
    finally:
        finish_wandb_run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML with model, data, training and obim.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint of output_dir.")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    hide_deepspeed_deprecations()  # DeepSpeed's own calls of deprecated torch collectives, at every ZeRO step
    # the trainer, its DDP wrapper or DeepSpeed engine are released, every rank waits for the others (the main
    # one may still be writing) and the process group is destroyed before interpreter exit, on failure too:
    # a group left to the exit itself hangs or aborts a rank now and then
    with process_group_teardown():
        return train(options.config, options.resume)


if __name__ == "__main__":
    sys.exit(main())

"""The demo's two training phases with the Hugging Face ``Trainer``: pretraining a tiny Llama from
scratch on the old languages, then continuing it on the new one with :class:`~obim_trainer.OBIMCallback`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from obim_trainer.demo.config import DemoConfig, Phase
from obim_trainer.demo.corpus import Corpus
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from obim_trainer.training.text import load_text_file, pack_blocks

logger = logging.getLogger(__name__)


def new_model(config: DemoConfig, tokenizer: Any) -> Any:
    """A randomly initialised Llama of ``config.model``'s shape over the demo tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    shape = config.model
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_attention_heads,
            intermediate_size=shape.intermediate_size,
            max_position_embeddings=config.block_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )


def training_arguments(config: DemoConfig, phase: Phase, output_dir: Path, **extra: Any) -> Any:
    from transformers import TrainingArguments

    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": phase.steps,
        "per_device_train_batch_size": phase.batch_size,
        "learning_rate": phase.learning_rate,
        "warmup_steps": phase.warmup_steps,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "logging_steps": max(1, phase.steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "seed": config.seed,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**values, **extra})


def make_trainer(model: Any, tokenizer: Any, train_file: Path, args: Any, config: DemoConfig, **extra: Any) -> Any:
    from transformers import DataCollatorForLanguageModeling, Trainer

    train = pack_blocks(load_text_file(train_file), tokenizer, "text", config.block_size)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(
        model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer, **extra
    )


def pretrain_base(config: DemoConfig, corpus: Corpus, tokenizer_dir: Path, base_dir: Path, work: Path) -> Path:
    """Train the base on the old languages and save it (weights, config, tokenizer) to ``base_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = training_arguments(config, config.pretrain, work / "pretraining")
    trainer = make_trainer(new_model(config, tokenizer), tokenizer, corpus.pretraining, args, config)
    logger.info("pretraining the base on %s for %d steps", "+".join(config.old_languages), config.pretrain.steps)
    trainer.train()
    trainer.save_model(str(base_dir))
    return base_dir


def obim_settings(config: DemoConfig, corpus: Corpus, base_dir: Path) -> OBIMConfig:
    """Record statistics and the per-language evaluation at every save; merge the best ``top_k`` at the end.

    Calibration is per language with the new one named, so the per-language methods of the comparison
    measure the base on the old languages and the checkpoints on the new one; OBIM reads all of it.
    """
    return OBIMConfig(
        base_model=base_dir,
        calibration_data={language: corpus.calibration(language) for language in config.languages},
        new_languages=[config.new_language],
        calibration_samples=config.calibration_samples,
        calibration_max_length=config.block_size,
        eval_data={language: corpus.eval(language) for language in config.languages},
        eval_samples=config.eval_entries,
        eval_max_length=config.block_size,
        select_metric=f"obim_{config.new_language}_loss",
        top_k=config.top_k,
        min_checkpoints=min(2, config.top_k),
        merge_at_end=True,
        keep_merged=1,
        seed=config.seed,
        on_error="raise",
    )


def continue_pretraining(config: DemoConfig, corpus: Corpus, base_dir: Path, run_dir: Path) -> OBIMCallback:
    """Continue the base on the new language with the callback attached; return the callback (its record)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    callback = OBIMCallback(obim_settings(config, corpus, base_dir))
    args = training_arguments(
        config,
        config.continued,
        run_dir,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_only_model=True,
        report_to=config.report_to,
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    trainer = make_trainer(model, tokenizer, corpus.train(config.new_language), args, config, callbacks=[callback])
    logger.info("continuing on %s for %d steps", config.new_language, config.continued.steps)
    trainer.train()
    return callback

"""A tiny continued-pretraining run for the callback tests, usable in-process and from subprocesses.

Two "languages" are word sets of the shared vocabulary: training text is all ``ja`` so its loss
falls and ``en`` is what the base knew. Everything is built from configs and local files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import WORDS, build_tokenizer, make_tiny_llama, save_model_folder, write_jsonl

LANGUAGE_WORDS = {"en": WORDS[: len(WORDS) // 2], "ja": WORDS[len(WORDS) // 2 :]}
MAX_LENGTH = 24


def language_texts(language: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(LANGUAGE_WORDS[language], k=rng.randint(4, 20))) for _ in range(n)]


@dataclass(frozen=True)
class RunInputs:
    """Folders and files of one run: tokenizer, base model, text per split, calibration text."""

    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def calibration(self) -> Path:
        return self.root / "calib.jsonl"

    def text_file(self, split: str) -> Path:
        return self.root / f"{split}.jsonl"


def build_inputs(root: Path) -> RunInputs:
    inputs = RunInputs(Path(root))
    inputs.root.mkdir(parents=True, exist_ok=True)
    inputs.tokenizer.mkdir()
    build_tokenizer(inputs.tokenizer)
    save_model_folder(make_tiny_llama(seed=3), inputs.base, inputs.tokenizer)
    write_jsonl(inputs.text_file("train"), language_texts("ja", 64, seed=21))
    write_jsonl(inputs.text_file("eval_en"), language_texts("en", 8, seed=31))
    write_jsonl(inputs.text_file("eval_ja"), language_texts("ja", 8, seed=41))
    write_jsonl(inputs.calibration, language_texts("ja", 12, seed=51))
    return inputs


def tokenized(inputs: RunInputs, split: str) -> Any:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    dataset = load_dataset("json", data_files=str(inputs.text_file(split)), split="train")
    return dataset.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH),
        batched=True,
        remove_columns=["text"],
    )


def eval_datasets(inputs: RunInputs) -> dict[str, Any]:
    return {language: tokenized(inputs, f"eval_{language}") for language in LANGUAGE_WORDS}


def callback_settings(inputs: RunInputs, **overrides: Any) -> dict[str, Any]:
    """OBIMConfig values for the run: select the best 2 by the Trainer's ja loss, evaluate both languages."""
    return {
        "base_model": inputs.base,
        "calibration_data": inputs.calibration,
        "calibration_max_length": MAX_LENGTH,
        "calibration_batch_size": 4,
        "eval_data": {language: inputs.text_file(f"eval_{language}") for language in LANGUAGE_WORDS},
        "eval_max_length": MAX_LENGTH,
        "select_metric": "eval_ja_loss",
        "top_k": 2,
        "saliency_blocks": 2,
        "histogram_bins": 16,
        "on_error": "raise",
        **overrides,
    }


CANDIDATES = [{"method": "regmean", "sweep": {"base_weight": [0.3, 3]}}, {"method": "fisher_merging"}]
"""Merges compared by the candidate tests: input Grams and Fisher diagonals, per language."""


def per_language_settings(inputs: RunInputs, **overrides: Any) -> dict[str, Any]:
    """:func:`callback_settings` with old (en) and new (ja) calibration text, no saliency logging, merging
    at the end unless ``overrides`` say otherwise."""
    en = inputs.root / "calib_en.jsonl"
    if not en.exists():
        write_jsonl(en, language_texts("en", 12, seed=61))
    values = {"calibration_data": {"en": en, "ja": inputs.calibration}, "new_languages": ["ja"]}
    values |= {"log_saliency": False, "merge_every_saves": 0, **overrides}
    return callback_settings(inputs, **values)


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes in ``folder/model.safetensors``: equal digests, equal merges."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    return {
        name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in tensors.items()
    }


def make_trainer(inputs: RunInputs, args: Any, callbacks: list[Any], model: Any = None) -> Any:
    """A Trainer on the run's data; the model is the base unless given (load it before the arguments
    exist to keep transformers' zero.Init, which needs DeepSpeed's process group, out of CPU tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    return Trainer(
        model=model if model is not None else AutoModelForCausalLM.from_pretrained(inputs.base),
        args=args,
        train_dataset=tokenized(inputs, "train"),
        eval_dataset=eval_datasets(inputs),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def eval_history(output_dir: Path, metric: str) -> dict[int, float]:
    """``metric`` by step from the newest trainer_state.json of a run (the Trainer's own record)."""
    states = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    history = json.loads(states[-1].read_text())["log_history"]
    return {int(e["step"]): float(e[metric]) for e in history if metric in e}


def example_config(
    inputs: RunInputs, output: Path, folder: Path, training: dict[str, Any], obim: dict[str, Any]
) -> Path:
    """configs/callback/example.yaml pointed at the run's files, with ``training`` and ``obim`` settings
    replacing or updating its own; written into ``folder``."""
    import yaml

    settings = yaml.safe_load((Path(__file__).parents[1] / "configs" / "callback" / "example.yaml").read_text())
    settings["model"] = str(inputs.base)
    settings["data"] = {
        "train": str(inputs.text_file("train")),
        "eval": {language: str(inputs.text_file(f"eval_{language}")) for language in LANGUAGE_WORDS},
        "block_size": MAX_LENGTH,
    }
    settings["training"] = {
        "output_dir": str(output),
        "save_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "learning_rate": 3e-3,
        "use_cpu": True,
        "disable_tqdm": True,
        "save_total_limit": 1,
        "ddp_find_unused_parameters": settings["training"]["ddp_find_unused_parameters"],  # the example's choice
        **training,
    }
    settings["obim"] |= {
        "calibration_data": str(inputs.calibration),
        "calibration_max_length": MAX_LENGTH,
        "eval_max_length": MAX_LENGTH,
        "top_k": 2,
        "on_error": "raise",
        **obim,
    }
    config = Path(folder) / "example.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config


def assert_recorded_stats_are_the_offline_ones(folder: Path, config: Any, scratch: Path) -> None:
    """The statistics the callback stored in ``folder`` (under the key the offline merge computes) equal
    statistics recomputed offline on the folder's weights, in one process."""
    import torch

    from obim_trainer.calibration import ActivationStats, stats_key, stats_path
    from obim_trainer.calibration.preparation import prepare_calibration
    from obim_trainer.checkpoints import open_checkpoint
    from obim_trainer.pipeline.merge import checkpoint_stats

    calibration = prepare_calibration(config, config.base, config.tokenizer_source)
    with open_checkpoint(folder) as reader:
        key = stats_key(calibration.fingerprint(), reader.fingerprint())
        live = ActivationStats.load(stats_path(reader.path, key), key)
        offline, _ = checkpoint_stats(
            reader,
            calibration,
            config.model_copy(update={"recompute_stats": True, "stats_cache_dir": scratch}),
            torch.device("cpu"),
        )
    assert live.count == offline.count
    for name, sq in offline.sq_sum.items():
        torch.testing.assert_close(live.sq_sum[name], sq, rtol=1e-5, atol=1e-6)

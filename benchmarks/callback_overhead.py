"""What does OBIMCallback cost a training run?

Trains the same model twice with the same saves — once plain, once with the callback recording
activation statistics (and, with ``--evaluate``, the per-language evaluation) at every save —
and reports the Trainer's training throughput of both and their ratio. Merging is off unless
``--merge`` is given (it runs once, at the end, and is then included).

The default model is a synthetic Llama (~12M parameters, float32) trained on random words on the
CPU; ``--model DIR`` uses any local causal LM folder with its tokenizer instead.
Run: ``python benchmarks/callback_overhead.py [--steps 40 --save-steps 10 --calibration-samples 100]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("callback_overhead")

WORDS = [f"w{i}" for i in range(500)]


def random_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=words)) for _ in range(n)]


def build_model(folder: Path, args: argparse.Namespace) -> None:
    """A word-level tokenizer over WORDS and a randomly initialised Llama of the requested shape."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=len(vocab),
        max_position_embeddings=args.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def train_once(model_dir: Path, work: Path, args: argparse.Namespace, callback: Any | None) -> dict[str, float]:
    """One training run; returns the Trainer's throughput and the wall time of ``train()``."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = random_texts(args.steps * args.batch_size, args.seq_len, seed=1)
    train = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=args.seq_len))
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=TrainingArguments(
            output_dir=str(work),
            max_steps=args.steps,
            save_steps=args.save_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            report_to="none",
            disable_tqdm=True,
            logging_steps=args.steps,
            use_cpu=args.cpu,
        ),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback] if callback is not None else [],
    )
    start = time.perf_counter()
    metrics = trainer.train().metrics
    return {"samples_per_second": metrics["train_samples_per_second"], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Local causal LM folder (default: a synthetic Llama).")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--calibration-samples", type=int, default=100)
    parser.add_argument("--evaluate", action="store_true", help="Also run the per-language evaluator at saves.")
    parser.add_argument("--merge", action="store_true", help="Also merge the best 2 checkpoints at the end.")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU even if a GPU is present.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("obim_trainer", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from obim_trainer.settings.callback import OBIMConfig
    from obim_trainer.training.callback import OBIMCallback

    with tempfile.TemporaryDirectory(prefix="obim-overhead-") as tmp:
        work = Path(tmp)
        model_dir = args.model or work / "model"
        if args.model is None:
            build_model(model_dir, args)
        calibration = write_jsonl(work / "calib.jsonl", random_texts(args.calibration_samples, args.seq_len, 2))
        settings: dict[str, Any] = {
            "base_model": model_dir,
            "calibration_data": calibration,
            "calibration_samples": args.calibration_samples,
            "calibration_max_length": args.seq_len,
            "select_metric": "obim_lang_loss" if args.evaluate else "step",
            "selector": "top_k" if args.evaluate else "latest",
            "top_k": 2,
            "merge_at_end": args.merge,
            "log_saliency": False,
        }
        if args.evaluate:
            settings["eval_data"] = {"lang": write_jsonl(work / "eval.jsonl", random_texts(64, args.seq_len, 3))}
        plain = train_once(model_dir, work / "plain", args, None)
        with_callback = train_once(model_dir, work / "obim", args, OBIMCallback(OBIMConfig.build(settings)))
    saves = args.steps // args.save_steps
    logger.info("%d steps of %d x %d tokens, %d saves", args.steps, args.batch_size, args.seq_len, saves)
    logger.info("without the callback: %.2f samples/s (%.1f s)", plain["samples_per_second"], plain["seconds"])
    logger.info(
        "with the callback:    %.2f samples/s (%.1f s)",
        with_callback["samples_per_second"],
        with_callback["seconds"],
    )
    ratio = with_callback["samples_per_second"] / plain["samples_per_second"]
    extra = (with_callback["seconds"] - plain["seconds"]) / max(saves, 1)
    logger.info("throughput ratio (with / without): %.3f; %.2f s more per save", ratio, extra)


if __name__ == "__main__":
    main()

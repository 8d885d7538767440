"""Offline merge, end to end, on CPU in seconds: a tiny Llama, three continued-pretraining checkpoints,
OBIM through the Python API, and the per-checkpoint ownership it reports.

The checkpoints are made here by training the base for a few steps on text the base never saw, so the
example runs anywhere without downloads. Run: python examples/offline_merge.py --workdir /tmp/obim-example
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from obim_trainer.pipeline.merge import merge_checkpoints

logger = logging.getLogger("offline_merge")

OLD = "the cat sat on the mat and the dog ran to the park where children play every day".split()
NEW = "der hund lief in den park wo kinder jeden tag spielen und die katze sass auf der matte".split()


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(6, 24))) for _ in range(n)]


def build_tokenizer(texts: list[str], folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: list[str], steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = tok(texts[(step * 8) % len(texts) :][:8], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@torch.no_grad()
def loss_on(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: list[str]) -> float:
    model.eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return float(model(**batch, labels=labels).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/offline_merge"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    old_train, new_train = sentences(OLD, 400, 1), sentences(NEW, 400, 2)
    old_eval, new_eval = sentences(OLD, 64, 3), sentences(NEW, 64, 4)
    tok = build_tokenizer(old_train + new_train, work / "tokenizer")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    train(model, tok, old_train, steps=150, lr=3e-3)
    base = work / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    rows = {"base": (loss_on(model, tok, old_eval), loss_on(model, tok, new_eval))}
    checkpoints = []
    for i in range(3):
        train(model, tok, new_train, steps=40, lr=3e-3)
        ckpt = work / "run" / f"checkpoint-{(i + 1) * 40}"
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        checkpoints.append(ckpt)
        rows[ckpt.name] = (loss_on(model, tok, old_eval), loss_on(model, tok, new_eval))
    calib = work / "calibration.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in new_train[:100]))
    result = merge_checkpoints(
        base=base, checkpoints=checkpoints, calibration_data=calib, output=work / "merged-obim", overwrite=True
    )
    merged = LlamaForCausalLM.from_pretrained(result.output)
    rows["obim merge"] = (loss_on(merged, tok, old_eval), loss_on(merged, tok, new_eval))
    lines = ["| model | old-language loss | new-language loss |", "|---|---|---|"]
    lines += [f"| {name} | {old:.3f} | {new:.3f} |" for name, (old, new) in rows.items()]
    shares = ", ".join(f"{s:.0%}" for s in result.manifest["ownership_share"])
    logger.info("results (lower is better):\n%s\nownership share per checkpoint: %s", "\n".join(lines), shares)


if __name__ == "__main__":
    main()
